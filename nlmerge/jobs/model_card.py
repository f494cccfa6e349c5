"""The README.md model card of a merged model, as ``mergekit-yaml`` writes one by default.

The card is what the Hugging Face Hub shows: YAML front matter (``library_name``, ``tags``; no
``base_model``: the Hub wants repo ids there, and nlmerge merges local folders, whose paths the
body lists) and a body naming the method (with its paper), the base model, the models merged and
the config that produced it. The wording is nlmerge's own.
"""
import yaml

CARD_NAME = "README.md"

# what each method does, with the paper or definition it follows
_METHODS = {
    "linear": "a weighted average of the models' parameters (Wortsman et al., 2022, *Model soups*)",
    "task_arithmetic": "task arithmetic: the base plus the weighted sum of the task vectors "
                       "(Ilharco et al., 2023, *Editing Models with Task Arithmetic*)",
    "ties": "TIES-merging: trim each task vector to its largest magnitudes, elect a sign per parameter, "
            "merge the agreeing entries (Yadav et al., 2023, *TIES-Merging*)",
    "dare_linear": "DARE: drop task vector entries at random and rescale the rest, then add them up "
                   "(Yu et al., 2024, *Language Models are Super Mario*)",
    "dare_ties": "DARE's random drops with TIES's sign election (Yu et al., 2024; Yadav et al., 2023)",
    "breadcrumbs": "Model Breadcrumbs: drop both the largest and the smallest magnitudes of each task vector "
                   "(Davari and Belilovsky, 2024)",
    "breadcrumbs_ties": "Model Breadcrumbs' trim with TIES's sign election (Davari and Belilovsky, 2024; "
                        "Yadav et al., 2023)",
    "consensus": "consensus merging: keep the entries of the multi-task vector that the TALL masks of at least k "
                 "tasks select (Wang et al., 2024, *Localizing Task Information for Improved Model Merging "
                 "and Compression*)",
    "tall": "TALL masks: one model per task, the base plus the task's mask of the multi-task vector "
            "(Wang et al., 2024, *Localizing Task Information for Improved Model Merging and Compression*)",
}


def model_card(config, inputs, task=None):
    """The README.md text of one merged model.

    Parameters
    ----------
    config : nlmerge.jobs.config.MergeConfig
        The job's config (its ``method``, ``base_model`` and ``source``: the YAML as given).
    inputs : list of str
        The models merged, as the config names them (the base first when the method has one).
    task : int, optional
        For a TALL job, the task (0-based index among the experts) whose model this card describes.

    Returns
    -------
    str
        YAML front matter, then Markdown.
    """
    method = config.method.name
    experts = [p for p in inputs if not (config.method.uses_base and p == config.base_model)]
    onto = " onto a base model" if config.method.uses_base else ""
    meta = {"library_name": "transformers", "tags": ["merge", "nlmerge"]}
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "",
             f"# A {method} merge of {len(experts)} models{onto}", ""]
    if task is not None:
        lines += [f"Task {task} of a TALL merge: the base plus task {task}'s mask of the multi-task vector, "
                  f"merged from pre-trained models with nlmerge.", ""]
    else:
        lines += ["Merged from pre-trained models with nlmerge.", ""]
    what = _METHODS[method]
    if method == "ties":
        here = []
        if config.parameters.get("convention") == "ties":
            here.append("the original TIES code's trim and zero-sign rule (`convention: ties`)")
        if config.parameters.get("scope") == "global":
            here.append("one exact threshold per task over the whole model (`scope: global`)")
        if here:
            what += "; here with " + " and ".join(here)
    lines += ["## Method", "", f"`{method}`: {what}.", ""]
    if config.base_model is not None and config.method.uses_base:
        lines += [f"Base model: `{config.base_model}`.", ""]
    lines += ["## Models merged", ""] + [f"- `{p}`" for p in experts] + [""]
    lines += ["## Configuration", "", "```yaml", yaml.safe_dump(config.source, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def is_merge_card(text):
    """Whether ``text`` (a README.md) is a merge's model card, nlmerge's or mergekit's (front matter
    tagged ``merge``): a previous job's card, that ``--force`` may replace or remove."""
    if not text.startswith("---\n"):
        return False
    front = text[4:].split("\n---", 1)[0]
    try:
        meta = yaml.safe_load(front)
    except yaml.YAMLError:
        return False
    return isinstance(meta, dict) and "merge" in (meta.get("tags") or [])
