# Helpers shared by the stage rules, as in the Snakemake workflow template: the sample-set names
# and the grid of sets the config asks for, the files the rules share, and each job's resources.
# The config checks are in validation.smk, the translation of config blocks into `duodiff` flags
# in flags.smk.
#
# Nothing here imports duodiff: on a cluster Snakemake itself may run outside the environment
# the jobs use (envs/duodiff.yaml), so the workflow reads the model YAMLs with plain PyYAML
# (validation.smk).

import re
from types import SimpleNamespace

from snakemake.exceptions import IncompleteCheckpointException

ENV = "../../envs/duodiff.yaml"

# The classifier types the schema allows: one list, read from the schema (validation.smk), so the
# wildcard patterns below cannot drift from what validation accepts.
CLASSIFIER_TYPES = SCHEMA["properties"]["early_exit"]["properties"]["classifier_types"]["items"]["enum"]

# ---- set names ---------------------------------------------------------------------------------
# Sample-set names (docs/architecture.md), each written in the wildcards of the rule that makes it,
# sample_<method> (sample.smk); and `real`, the held-out real images (rule real_set). The patterns
# make every name parse one way only.

WILDCARD_PATTERNS = {
    "experiment": r"[A-Za-z0-9][A-Za-z0-9_-]*",
    "depth": r"\d+",
    "steps": r"\d+",
    "t_switch": r"\d+",
    "classifier_type": "|".join(CLASSIFIER_TYPES),
    "threshold": r"\d+(\.\d+)?(e-\d+)?",
    "cache_interval": r"\d+",
    "cache_keep": r"\d+",
    "router_threshold": r"\d+(\.\d+)?(e-\d+)?",
}
SET_NAMES = {
    "full": "full",
    "fewer_steps": "full_steps{steps}",
    "shallow": "shallow_d{depth}",
    "early_exit": "ee_{classifier_type}_thr{threshold}",
    "duodiff": "duodiff_d{depth}_ts{t_switch}",
    # DeepCache-style caching (config `cache`): the whole network every N steps, k blocks at each end between
    "cache": "cache_N{cache_interval}_k{cache_keep}",
    # Learning-to-Cache (config `learning_to_cache`): the trained router, gates at most the threshold reuse
    "l2c": "l2c_thr{router_threshold}",
    # composed (config `composed`): early exit or DuoDiff at fewer steps, DuoDiff with early exit in
    # the full model's phase. No field pattern holds an underscore, so no name matches two forms.
    "early_exit_steps": "ee_{classifier_type}_thr{threshold}_steps{steps}",
    "duodiff_steps": "duodiff_d{depth}_ts{t_switch}_steps{steps}",
    "duodiff_early_exit": "duodiff_d{depth}_ts{t_switch}_ee_{classifier_type}_thr{threshold}",
    "duodiff_early_exit_steps": "duodiff_d{depth}_ts{t_switch}_ee_{classifier_type}_thr{threshold}_steps{steps}",
    # DuoDiff whose full model's phase is cached (the whole network every N steps of that phase)
    "duodiff_cache": "duodiff_d{depth}_ts{t_switch}_cache_N{cache_interval}_k{cache_keep}",
}
COMPOSED_FORMS = (
    "early_exit_steps",
    "duodiff_steps",
    "duodiff_early_exit",
    "duodiff_early_exit_steps",
    "duodiff_cache",
)


def sample_rule(form: str) -> str:
    """Which sample.smk rule samples the sets of a name form (sample_<method> or sample_composed_<form>)."""
    return f"sample_composed_{form}" if form in COMPOSED_FORMS else f"sample_{form}"


def set_name_regex(name: str, named: bool = True) -> str:
    """'shallow_d{depth}' -> 'shallow_d(?P<depth>\\d+)' (named=False: without the group names)."""
    return re.sub(
        r"\{(\w+)\}",
        lambda m: f"(?P<{m[1]}>{WILDCARD_PATTERNS[m[1]]})" if named else f"(?:{WILDCARD_PATTERNS[m[1]]})",
        name,
    )


wildcard_constraints:
    **WILDCARD_PATTERNS,
    set="|".join([set_name_regex(name, named=False) for name in SET_NAMES.values()] + ["real"]),


def threshold_label(value) -> str:
    """The threshold as it appears in set names: Python's shortest round-trip float text
    (0.1 -> '0.1', 0.05 -> '0.05', 1 -> '1.0'), so two different thresholds never share a name."""
    return repr(float(value))


# ---- what the configured grid asks for ---------------------------------------------------------


def shallow_depths() -> dict:
    """{depth: model config path} of the configured shallow models, in config order."""
    return {read_model_config(path)["depth"]: path for path in config["models"]["shallow"]}


def shallow_config(wildcards) -> str:
    depth = int(wildcards.depth)
    models = shallow_depths()
    if depth not in models:
        raise ValueError(f"no shallow model of depth {depth} in models.shallow (depths: {sorted(models)})")
    return models[depth]


def sample_sets() -> list:
    """Every sample set of the study, in the order of the papers' tables."""
    names, sampling, early_exit = SET_NAMES, config["sampling"], config["early_exit"]
    sets = [names["full"]]
    sets += [names["fewer_steps"].format(steps=steps) for steps in sorted(sampling["fewer_steps"], reverse=True)]
    sets += [names["shallow"].format(depth=depth) for depth in shallow_depths()]
    sets += [
        names["early_exit"].format(classifier_type=classifier, threshold=threshold_label(threshold))
        for classifier in early_exit["classifier_types"]
        for threshold in early_exit["thresholds"]
    ]
    sets += [
        names["duodiff"].format(depth=depth, t_switch=t)
        for depth in shallow_depths()
        for t in config["duodiff"]["t_switch"]
    ]
    sets += [
        names["cache"].format(cache_interval=n, cache_keep=config["cache"]["keep_blocks"])
        for n in config["cache"]["interval"]
    ]
    sets += [
        names["l2c"].format(router_threshold=threshold_label(tau)) for tau in config["learning_to_cache"]["thresholds"]
    ]
    sets += [name for name in composed_sets() if name not in sets]
    return sets


# ---- composed policies (config `composed`) -------------------------------------------------------
# Each entry is one grid: its ingredients fixed, one knob (t_switch, threshold or steps) swept.
# validation.smk (_check_composed) checked the entries. duodiff.core.study.composed_family_label
# builds the same family labels for the tables (tests/test_vocabulary.py keeps them equal).
COMPOSED_KNOBS = ("t_switch", "threshold", "cache_interval", "steps")


def composed_form(entry: dict) -> str:
    """The set-name form of a composed entry (a key of SET_NAMES)."""
    if "duodiff" not in entry:
        return "early_exit_steps"
    if "cache_interval" in entry:
        return "duodiff_cache"
    if "early_exit" not in entry:
        return "duodiff_steps"
    return "duodiff_early_exit_steps" if "steps" in entry else "duodiff_early_exit"


def composed_knob(entry: dict) -> str:
    return next(knob for knob in COMPOSED_KNOBS if isinstance(entry.get(knob), list))


def composed_family_label(fields: dict, knob: str) -> str:
    """A family's label: its fixed ingredients, the knob left out (duodiff.core.study's twin)."""
    parts = []
    if fields.get("depth") is not None:
        parts.append(f"DuoDiff d{fields['depth']}" + (f", t_switch {fields['t_switch']}" if knob != "t_switch" else ""))
    if fields.get("classifier_type") is not None:
        threshold = f" τ {threshold_label(fields['threshold'])}" if knob != "threshold" else ""
        parts.append(f"{fields['classifier_type']}{threshold}")
    if fields.get("cache_keep") is not None:
        interval = f", N {fields['cache_interval']}" if knob != "cache_interval" else ""
        parts.append(f"caching k = {fields['cache_keep']}{interval}")
    label = " + ".join(parts)
    return label + (f" at {fields['steps']} steps" if knob != "steps" and fields.get("steps") is not None else "")


def composed_families() -> list:
    """Per `composed` entry: {"template": its set name with the knob left as a placeholder
    ({threshold}, {t_switch} or {steps}), "knob", "values": the configured list, "label": the
    family's label}. The search for operating points (point 2 of issue 21) probes other values of
    the knob through the template; a threshold is written with threshold_label."""
    families = []
    for entry in config["composed"]:
        knob = composed_knob(entry)
        fields = {
            "depth": entry.get("duodiff"),
            "t_switch": entry.get("t_switch"),
            "classifier_type": entry.get("early_exit"),
            "threshold": entry.get("threshold"),
            "cache_interval": entry.get("cache_interval"),
            "cache_keep": entry.get("cache_keep"),
            "steps": entry.get("steps"),
        }
        fields = {key: value for key, value in fields.items() if value is not None}
        fixed = {key: value for key, value in fields.items() if key != knob}
        if "threshold" in fixed:
            fixed["threshold"] = threshold_label(fixed["threshold"])
        template = SET_NAMES[composed_form(entry)].format(**fixed, **{knob: f"{{{knob}}}"})
        # One value: the label names every ingredient, as the tables' does (they see one set).
        label = (
            composed_family_label(fields, knob)
            if len(entry[knob]) > 1
            else composed_family_label({**fields, knob: entry[knob][0]}, None)
        )
        families.append({"template": template, "knob": knob, "values": list(entry[knob]), "label": label})
    return families


def composed_sets() -> list:
    """The sample sets of every `composed` entry, entry by entry in its knob's configured order."""
    sets = []
    for family in composed_families():
        for value in family["values"]:
            text = threshold_label(value) if family["knob"] == "threshold" else value
            name = family["template"].format(**{family["knob"]: text})
            if name not in sets:
                sets.append(name)
    return sets


def scored_sets() -> list:
    """Every set the tables score: the sample sets and, when reference.n_real > 0, the real images."""
    return sample_sets() + (["real"] if config["reference"]["n_real"] > 0 else [])


# ---- outputs and inputs the rule files share ------------------------------------------------------
# One study per folder: everything an experiment computes, its tables, plots, logs, benchmarks
# and report included, lies under results/<experiment>/, so two experiments never share a file.


def study_path(path: str) -> str:
    """results/<experiment>/<path> of the configured experiment: the study-wide files (tables,
    plots), which the configured grid of sets defines, exist for that experiment only."""
    return f"results/{config['experiment']}/{path}"


SET_FILES = {"stats": "stats.json", "grid": "grid.png", "exit_layers": "exit_layers.pt"}


def set_file(kind: str, set_name: str = "{set}") -> str:
    """A file of a sample set's folder (docs/architecture.md): what the sample rules (and
    real_set: stats.json) write, and what the scores, tables and plots read. stats.json is written
    last, so it also stands for the set's undeclared images/."""
    return f"results/{{experiment}}/samples/{set_name}/{SET_FILES[kind]}"


def sample_outputs(method):
    """The declared files of the sets of a name form (rule sample_rule(method)), the grid flagged
    for the report."""
    outputs = {kind: set_file(kind, SET_NAMES[method]) for kind in SET_FILES}
    outputs["grid"] = report(
        outputs["grid"],
        caption="../report/grid.rst",
        category="4. Samples",  # after the plots and tables (report.smk)
        subcategory=SAMPLE_SUBCATEGORIES["composed" if method in COMPOSED_FORMS else method],
        labels=lambda wildcards: {"set": sample_label(wildcards)},
    )
    return outputs


# The report's Samples menu, in reading order: the real images (report.smk, rule plots) first.
SAMPLE_SUBCATEGORIES = {
    "real": "0. Real images",
    "full": "1. Full U-ViT",
    "fewer_steps": "2. Fewer steps",
    "shallow": "3. Shallow U-ViT alone",
    "early_exit": "4. Early exit",
    "duodiff": "5. DuoDiff",
    "composed": "6. Composed",
    "cache": "7. Caching",
    "l2c": "8. Learning-to-Cache",
}
# The probes as the report names them (the tables' cells.PROBE_NAMES, duodiff.report.tables).
PROBE_NAMES = {
    "attention_probe": "attention probe",
    "mlp_probe_per_layer": "MLP probe per layer",
    "mlp_probe_per_timestep": "MLP probe per timestep",
    "mlp_probe_per_layer_per_timestep": "MLP probe per layer and timestep",
}


def sample_label(wildcards) -> str:
    """A sample set's grid as the report's Samples menu lists it: its setting in words, no set id."""
    fields = dict(wildcards.items())
    parts = []
    if "depth" in fields and "t_switch" in fields:
        parts.append(f"shallow depth {fields['depth']}, t_switch = {fields['t_switch']}")
    elif "depth" in fields:
        parts.append(f"{fields['depth']} block" + ("" if fields["depth"] == "1" else "s"))
    if "classifier_type" in fields:
        parts.append(f"{PROBE_NAMES[fields['classifier_type']]}, threshold = {fields['threshold']}")
    if "steps" in fields:
        parts.append(f"{fields['steps']} steps")
    if "cache_interval" in fields:
        parts.append(
            f"the whole network every {fields['cache_interval']} steps, {fields['cache_keep']} outer blocks between"
        )
    if "router_threshold" in fields:
        parts.append(f"learned router, threshold = {fields['router_threshold']}")
    return "; ".join(parts) or f"every block, {config['sampling']['steps']} steps"


def trained(path: str) -> str:
    """A model file the sets are drawn from: the experiment's own, or models.trained_in's (a
    variant that samples another study's models; the training rules then run under that study)."""
    source = config["models"]["trained_in"]
    return path if source is None else path.replace("{experiment}", source)


def sample_models(wildcards) -> dict:
    """The model file(s) a sample set was drawn from, by its name: the inputs of the rule that made
    it (sample_<method>). `duodiff flops` reads them again, through the paths in stats.json."""
    for method, name in SET_NAMES.items():
        match = re.fullmatch(set_name_regex(name), wildcards.set)
        if match:
            values = {"experiment": wildcards.experiment, **match.groupdict()}
            inputs = getattr(rules, sample_rule(method)).input
            return {key: expand(path, **values) for key, path in inputs.items()}
    raise ValueError(f"set {wildcards.set} was not drawn from a model (sample sets: {', '.join(SET_NAMES.values())})")


def feature_net_files() -> dict:
    """The dataset classifier's files (rule feature_net) that scoring reads with metrics.headline
    classifier: the network, and feature_net.json beside it (its dataset, checked against the
    reference's)."""
    if config["metrics"]["headline"] != "classifier":
        return {}
    return {"feature_net": rules.feature_net.output.model, "feature_net_info": rules.feature_net.output.info}


# The set every generated set is compared with, sample by sample (duodiff.metrics.paired): they all
# start from the same noise and labels (sampling.seed).
BASELINE_SET = "full"


def paired_baseline(wildcards) -> dict:
    """The baseline's features, which `duodiff score --baseline` pairs a set's scores with: every
    generated set but the baseline itself and the real images (not drawn from the sets' noise)."""
    if wildcards.set in (BASELINE_SET, "real"):
        return {}
    folder = f"results/{wildcards.experiment}/metrics/{BASELINE_SET}"
    files = {"baseline_fid": f"{folder}/fid_features.npz"}
    if config["metrics"]["headline"] == "classifier":
        files["baseline_fd_classifier"] = f"{folder}/fd_classifier_features.npz"
    return files


def study_models(wildcards) -> dict:
    """Every model file the study's sample sets were drawn from (sample_models of each set), for
    the one flops job; the keys name the set they came from."""
    models = {}
    for name in sample_sets():
        inputs = sample_models(SimpleNamespace(experiment=config["experiment"], set=name))
        models.update({f"{name}.{key}": path for key, path in inputs.items()})
    return models


def study_files(kind):
    """The per-set (or per-model) files of the configured study that the tables and plots read:
    the outputs of the rules that write them, for every set (or model) of the configured grid."""
    experiment = config["experiment"]
    if kind == "losses":  # one per trained model (a full model converted from a checkpoint has none)
        converted = config["models"]["full_checkpoint"] is not None
        return (
            ([] if converted else expand(trained(rules.train_full.output.loss), experiment=experiment))
            + expand(trained(rules.train_shallow.output.loss), experiment=experiment, depth=list(shallow_depths()))
            + expand(
                trained(rules.train_early_exit.output.loss),
                experiment=experiment,
                classifier_type=config["early_exit"]["classifier_types"],
            )
        )
    if kind == "fd_classifier" and config["metrics"]["headline"] != "classifier":
        return []
    if kind == "cmmd" and not config["metrics"]["cmmd"]["enabled"]:
        return []
    if kind == "gflops":  # rule flops writes them all, the study's own already
        return list(rules.flops.output)
    patterns = {
        "stats": set_file("stats"),
        "exit_layers": set_file("exit_layers"),
        "grids": set_file("grid"),
        "fid": rules.score.output.fid,
        "fd_classifier": rules.score.output.get("fd_classifier"),
        "cmmd": rules.cmmd.output,
    }
    # Scores cover the real images too; sampling cost and exits exist for generated sets only.
    sets = scored_sets() if kind in ("fid", "fd_classifier", "cmmd") else sample_sets()
    return expand(patterns[kind], experiment=experiment, set=sets)


# ---- latent diffusion (config autoencoder) ---------------------------------------------------------

LATENTS = "results/{experiment}/latents/latents.npz"  # rule encode writes it, the trainings read it


def latent_inputs() -> dict:
    """The trainings' latents when autoencoder.path is set (latent diffusion), else nothing."""
    return {"latents": LATENTS} if config["autoencoder"]["path"] is not None else {}


def autoencoder_inputs() -> dict:
    """The autoencoder's files (its weights, and a single file's architecture) where they are read:
    encoding, and decoding each sample set (and, through sample_models, counting its decoder)."""
    autoencoder = config["autoencoder"]
    if autoencoder["path"] is None:
        return {}
    files = {"autoencoder": autoencoder["path"]}
    if autoencoder["config"] is not None:
        files["autoencoder_config"] = autoencoder["config"]
    # A file not there yet is left out, so a dry run plans every job (validation.smk warned; a real
    # run stopped before planning).
    return {key: path for key, path in files.items() if Path(path).exists()}


def resources(kind: str) -> dict:
    return config["resources"][kind]


# ---- operating points found by search (rules/search.smk, `duodiff search`) -------------------------
# Each family has one knob: its domain, which way it gets cheaper, and whether it is an integer.
# The expensive end is the full model itself (all steps, τ 0, t_switch 0): a pass by definition.
SEARCH_KNOBS = {
    "steps": {"low": 1, "high": "steps", "cheaper": "lower", "integer": True},
    "threshold": {"low": 0.0, "high": 1.0, "cheaper": "higher", "integer": False},
    "t_switch": {"low": 0, "high": "steps", "cheaper": "higher", "integer": True},
    # caching: N = 1 runs the whole network every step (the full model); a longer interval is cheaper
    "cache_interval": {"low": 1, "high": "steps", "cheaper": "higher", "integer": True},
    # Learning-to-Cache: a higher threshold closes more gates (more layers reuse), so it is cheaper
    "router_threshold": {"low": 0.0, "high": 1.0, "cheaper": "higher", "integer": False},
}


def search_family(family_id: str, label: str, template: str, knob: str, grid) -> dict:
    """One searched family: its label (as the tables name it), set-name template (one {knob}
    placeholder), the knob's domain, direction, resolution (search.resolution) and the grid values
    that seed the bracket. A t_switch is at most the family's steps: the template's own (a composed
    family at fewer steps) or sampling.steps."""
    spec = SEARCH_KNOBS[knob]
    steps = re.search(r"_steps(\d+)$", template)
    high = (int(steps[1]) if steps else config["sampling"]["steps"]) if spec["high"] == "steps" else spec["high"]
    return {
        "id": family_id,
        "label": label,
        "template": template,
        "knob": knob,
        "low": spec["low"],
        "high": high,
        "cheaper": spec["cheaper"],
        "integer": spec["integer"],
        "resolution": config["search"]["resolution"][knob],
        "grid": list(grid),
    }


def search_families() -> dict:
    """{family id: family} of the configured study (empty with search.enabled false): fewer steps,
    early exit per classifier type, DuoDiff per shallow depth, caching (its keep_blocks fixed),
    then the composed policies. A family id is wildcard-safe: fewer_steps,
    early_exit-attention_probe, duodiff-d3, cache-k1."""
    if not config["search"]["enabled"]:
        return {}
    sampling, families = config["sampling"], []
    if sampling["fewer_steps"]:
        families.append(
            search_family("fewer_steps", "fewer steps", SET_NAMES["fewer_steps"], "steps", sampling["fewer_steps"])
        )
    for classifier in config["early_exit"]["classifier_types"]:
        template = SET_NAMES["early_exit"].replace("{classifier_type}", classifier)
        label = f"early exit, {classifier}"
        families.append(
            search_family(f"early_exit-{classifier}", label, template, "threshold", config["early_exit"]["thresholds"])
        )
    for depth in shallow_depths():
        template = SET_NAMES["duodiff"].replace("{depth}", str(depth))
        label = f"DuoDiff, {depth}-block shallow"
        families.append(search_family(f"duodiff-d{depth}", label, template, "t_switch", config["duodiff"]["t_switch"]))
    cache = config["cache"]
    if cache["interval"]:
        template = SET_NAMES["cache"].replace("{cache_keep}", str(cache["keep_blocks"]))
        label = f"caching, k = {cache['keep_blocks']}"
        families.append(
            search_family(f"cache-k{cache['keep_blocks']}", label, template, "cache_interval", cache["interval"])
        )
    l2c = config["learning_to_cache"]
    if l2c["thresholds"]:
        families.append(
            search_family("l2c", "Learning-to-Cache", SET_NAMES["l2c"], "router_threshold", l2c["thresholds"])
        )
    # Composed policies (issue 21, point 3): each {"template", "knob", "values", "label"} is one
    # family more, its id the template with the knob's placeholder dropped.
    for composed in composed_families():
        # The template without its knob's placeholder, wildcard-safe (the tables derive the same id).
        unset = composed["template"].replace(f"{{{composed['knob']}}}", "")
        family_id = f"composed-{re.sub(r'[^A-Za-z0-9_-]', '', unset)}"
        label = f"composed: {composed['label']}"
        families.append(search_family(family_id, label, composed["template"], composed["knob"], composed["values"]))
    return {family["id"]: family for family in families}


def headline_score_file(set_name: str, experiment: str) -> str:
    """The score file the search reads a set's headline score and paired difference from."""
    key = "fd_classifier" if config["metrics"]["headline"] == "classifier" else "fid"
    return expand(rules.score.output[key], experiment=experiment, set=set_name)[0]


SEARCH_RESULT = "results/{experiment}/search/{family}/search.json"


def search_results(wildcards=None) -> list:
    """Every family's finished search (made by the search_result checkpoint), as plain paths. The
    default target asks for them all, so every family's rounds join the DAG at once and run side
    by side."""
    return expand(SEARCH_RESULT, experiment=config["experiment"], family=list(search_families()))


def search_probe_sets(wildcards=None) -> list:
    """The sets the searches probed (not the grid's), in family then round order. It reads each
    family's search.json through checkpoints.search_result.get, which raises until that search is
    done: Snakemake then evaluates the asking job's inputs again once it is (dry runs included,
    where a finished search's files are read back)."""
    experiment, grid, probes = config["experiment"], set(sample_sets()), []
    for family in search_families():
        path = checkpoints.search_result.get(experiment=experiment, family=family).output[0]
        with open(path) as handle:
            final = json.load(handle)
        probes += [p["set"] for p in final["probes"] if p["source"] == "search" and p["set"] not in grid]
    return list(dict.fromkeys(probes))


def probe_files(kind: str):
    """An input function: the per-set files of kind (stats, exit_layers, score, gflops) of every
    probe set, known once the searches are done (through the checkpoints)."""

    def files(wildcards):
        experiment = config["experiment"]
        patterns = {
            "stats": set_file("stats"),
            "exit_layers": set_file("exit_layers"),
            "fid": rules.score.output.fid,
            "fd_classifier": rules.score.output.get("fd_classifier"),
            "gflops": "results/{experiment}/metrics/{set}/gflops.json",
        }
        if patterns[kind] is None:
            return []
        return expand(patterns[kind], experiment=experiment, set=search_probe_sets())

    return files


def probe_models(wildcards) -> dict:
    """The model files of the probe sets (sample_models of each), for the timing job."""
    models = {}
    for name in search_probe_sets():
        inputs = sample_models(SimpleNamespace(experiment=config["experiment"], set=name))
        models.update({f"{name}.{key}": path for key, path in inputs.items()})
    return models


# The search's rounds (rules/search.smk): what each round reads, its flags, and a family's last round.


def search_round_inputs(wildcards) -> dict:
    """Round 0: the full model's and the grid sets' scores. Round r: round r-1's file and the
    score of the probe it asked for."""
    family = search_families()[wildcards.family]
    r = int(wildcards.round)
    inputs = {"full": headline_score_file(BASELINE_SET, wildcards.experiment)}
    if r == 0:
        names = [family["template"].replace(f"{{{family['knob']}}}", knob_label(family, v)) for v in family["grid"]]
        inputs["grid"] = [headline_score_file(name, wildcards.experiment) for name in names]
        return inputs
    previous = checkpoints.search_round.get(experiment=wildcards.experiment, family=wildcards.family, round=r - 1)
    with open(previous.output[0]) as handle:
        before = json.load(handle)
    if before["done"]:
        raise ValueError(f"search {wildcards.family}: round {r - 1} is done ({before['reason']}): no round {r}")
    inputs["previous"] = previous.output[0]
    inputs["probe"] = headline_score_file(before["next"], wildcards.experiment)
    return inputs


def knob_label(family: dict, value) -> str:
    """A knob value as set names spell it (duodiff.search.rounds.set_name)."""
    return str(int(value)) if family["integer"] else threshold_label(value)


def search_flags(wildcards) -> str:
    family = search_families()[wildcards.family]
    flags = (
        f"--family {family['id']} --label '{family['label']}' --template '{family['template']}' --knob {family['knob']} "
        f"--low {family['low']} --high {family['high']} --cheaper {family['cheaper']} "
        f"--resolution {family['resolution']} {'--integer' if family['integer'] else '--no-integer'} "
        f"--budget {config['search']['budget']} --headline {config['metrics']['headline']} "
        f"--margin {config['metrics']['equal_quality_margin']}"
    )
    if int(wildcards.round) == 0:
        flags += " --grid " + " ".join(knob_label(family, v) for v in family["grid"])
    return flags


def last_round(wildcards) -> str:
    """A family's last round file: the rounds in order, each read through the checkpoint (which
    raises until it has run, and Snakemake then asks again), up to the one that says done."""
    r = 0
    while True:
        path = checkpoints.search_round.get(experiment=wildcards.experiment, family=wildcards.family, round=r).output[0]
        with open(path) as handle:
            if json.load(handle)["done"]:
                return path
        r += 1
