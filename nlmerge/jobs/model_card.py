"""The README.md model cards of nlmerge's outputs: a merged model's, as ``mergekit-yaml`` writes
one by default, and a corrected model's (``nlmerge correct``).

A card is what the Hugging Face Hub shows: YAML front matter (``library_name``, ``tags``; no
``base_model``: the Hub wants repo ids there, and nlmerge reads local folders, whose paths the
body lists) and a body naming the method (with its paper), the models it started from and the
settings that produced it. The wording is nlmerge's own.
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
    if task is not None:
        intro = (f"Task {task} of a TALL merge: the base plus task {task}'s mask of the multi-task vector, "
                 f"merged from pre-trained models with nlmerge.")
    else:
        intro = "Merged from pre-trained models with nlmerge."
    what = _METHODS[method]
    if method == "ties":
        here = []
        if config.parameters.get("convention") == "ties":
            here.append("the original TIES code's trim and zero-sign rule (`convention: ties`)")
        if config.parameters.get("scope") == "global":
            here.append("one exact threshold per task over the whole model (`scope: global`)")
        if here:
            what += "; here with " + " and ".join(here)
    about = [f"`{method}`: {what}."]
    if config.base_model is not None and config.method.uses_base:
        about += ["", f"Base model: `{config.base_model}`."]
    return _card(f"A {method} merge of {len(experts)} model{'' if len(experts) == 1 else 's'}{onto}", intro, [
        ("Method", about),
        ("Models merged", [f"- `{p}`" for p in experts]),
        ("Configuration", _yaml_block(config.source)),
    ])


def correction_card(record):
    """The README.md text of one corrected model that ``nlmerge correct`` writes.

    Parameters
    ----------
    record : dict
        What the job records in ``nlmerge_correct.json``: ``method`` ("tact" or "repair"),
        ``task`` (TACT's task, None for REPAIR), ``merged``, ``experts``, ``data``, ``eps``,
        ``batch_size``, ``module`` and ``sites``.

    Returns
    -------
    str
        YAML front matter, then Markdown.
    """
    method, task = record["method"], record["task"]
    if method == "tact":
        title = f"A TACT correction of a merged model, task {task}"
        intro = (f"The merged model `{record['merged']}` corrected towards expert {task} on task {task}'s data "
                 "with nlmerge, the correction folded into the weights.")
        what = (f"TACT, task-specific activation correction: at every correction site, each channel is rescaled "
                f"and shifted so that its mean and standard deviation on task {task}'s data are expert {task}'s")
    else:
        title = "A REPAIR correction of a merged model"
        intro = (f"The merged model `{record['merged']}` corrected towards its experts' average statistics with "
                 "nlmerge, the correction folded into the weights.")
        what = ("REPAIR: at every correction site, each channel is rescaled and shifted so that its mean and "
                "standard deviation on all tasks' data are the experts' averaged ones (Jordan et al., 2023, "
                "*REPAIR: REnormalizing Permuted Activations for Interpolation Repair*)")
    where = f" of `{record['module']}`" if record["module"] else ""
    settings = {k: v for k, v in record.items() if k != "sites"}
    return _card(title, intro, [
        ("Method", [f"`{method}`: {what}.", "", f"{len(record['sites'])} sites{where}, listed in "
                    "`nlmerge_correct.json`."]),
        ("Models and data", [f"- merged model: `{record['merged']}`"]
         + [f"- task {t}: expert `{e}`, data `{d}`" for t, (e, d) in enumerate(zip(record["experts"], record["data"]))]),
        ("Settings", _yaml_block(settings)),
    ])


def _card(title, intro, sections):
    """A card's text: the Hub's front matter, ``# title``, the ``intro`` paragraph, then each
    ``(heading, lines)`` of ``sections``."""
    meta = {"library_name": "transformers", "tags": ["merge", "nlmerge"]}
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "", f"# {title}", "", intro, ""]
    for heading, body in sections:
        lines += [f"## {heading}", "", *body, ""]
    return "\n".join(lines)


def _yaml_block(obj):
    return ["```yaml", yaml.safe_dump(obj, sort_keys=False).rstrip(), "```"]


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
