# Helpers shared by the stage rules: the config checks the JSON schema cannot express, the
# sample-set names, and the translation of config blocks into `duodiff` flags.
#
# Nothing here imports duodiff: on a cluster Snakemake itself may run outside the environment
# the jobs use (envs/duodiff.yaml), so the workflow reads the model YAMLs with plain PyYAML.

import functools
import shlex
from pathlib import Path

import yaml

ENV = "../../envs/duodiff.yaml"

# The classifier types and datasets the schema allows: one list, read from the schema, so the
# wildcard patterns below cannot drift from what validation accepts.
with open(Path(workflow.basedir, "schemas", "config.schema.yaml")) as _f:
    _SCHEMA = yaml.safe_load(_f)
CLASSIFIER_TYPES = _SCHEMA["properties"]["early_exit"]["properties"]["classifier_types"]["items"]["enum"]

# Datasets torchvision can download; the others must already be in dataset.root.
DOWNLOADABLE = ("cifar10", "celeba")
# Datasets that read files (digits ships with scikit-learn).
NEEDS_ROOT = ("cifar10", "celeba", "imagenet64", "imagefolder")
# Datasets with class labels and small native images, on which metrics.headline classifier can
# train its feature network (duodiff.data.NUM_CLASSES and NATIVE_SIZE).
LABELLED_SMALL = ("digits", "cifar10")
# A shallow model replaces the full one for the first t_switch steps on the same images
# (and the same class labels), so these must agree between the two.
SHARED_MODEL_KEYS = ("img_size", "patch_size", "in_chans", "num_classes")
# duodiff.data.NATIVE_SIZE and CHANNELS (tests/test_workflow.py keeps them in step): each dataset's
# image size when dataset.image_size is null (None: it has no native size) and its channel count.
DATASET_NATIVE_SIZE = {"digits": 8, "cifar10": 32, "celeba": 64, "imagenet64": 64, "imagefolder": None}
DATASET_CHANNELS = {"digits": 1, "cifar10": 3, "celeba": 3, "imagenet64": 3, "imagefolder": 3}


# ---- set names ---------------------------------------------------------------------------------
# Sample-set names (docs/architecture.md): full, shallow_d<depth>, ee_<classifier>_thr<threshold>,
# duodiff_d<depth>_ts<t_switch>. The patterns make every name parse one way only.

THRESHOLD_PATTERN = r"\d+(\.\d+)?(e-\d+)?"


wildcard_constraints:
    experiment=r"[A-Za-z0-9][A-Za-z0-9_-]*",
    depth=r"\d+",
    steps=r"\d+",
    t_switch=r"\d+",
    classifier_type="|".join(CLASSIFIER_TYPES),
    threshold=THRESHOLD_PATTERN,
    set="|".join(
        [
            r"full",
            r"full_steps\d+",
            r"real",
            r"shallow_d\d+",
            rf"ee_({'|'.join(CLASSIFIER_TYPES)})_thr{THRESHOLD_PATTERN}",
            r"duodiff_d\d+_ts\d+",
        ]
    ),


def threshold_label(value) -> str:
    """The threshold as it appears in set names: Python's shortest round-trip float text
    (0.1 -> '0.1', 0.05 -> '0.05', 1 -> '1.0'), so two different thresholds never share a name."""
    return repr(float(value))


# ---- config checks -----------------------------------------------------------------------------


def schema_error_message(error) -> str:
    """One line from snakemake.utils.validate's WorkflowError: the config key, what is wrong
    with it (jsonschema names the allowed values or the bound) and the key's description."""
    import jsonschema

    # validate() raises its WorkflowError while handling jsonschema's ValidationError.
    cause = error.__cause__ or error.__context__
    if not isinstance(cause, jsonschema.exceptions.ValidationError):
        return str(error)
    key = ""
    for part in cause.absolute_path:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    description = _schema_description(cause.absolute_schema_path)
    message = f"invalid config: {key or 'top level'}: {cause.message}"
    if description:
        message += f" ({' '.join(description.split())})"
    return message


def _schema_description(schema_path):
    """The description of the innermost schema on `schema_path` that has one. jsonschema's paths
    step over "$ref" (the referenced schema's keywords appear as if written in place)."""
    node, description = _SCHEMA, None
    for part in schema_path:
        while isinstance(node, dict) and part not in node and "$ref" in node:
            node = functools.reduce(lambda n, name: n[name], node["$ref"].removeprefix("#/").split("/"), _SCHEMA)
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            break
        if isinstance(node, dict) and "description" in node:
            description = node["description"]
    return description


@functools.cache
def read_model_config(path: str) -> dict:
    if not Path(path).is_file():
        raise ValueError(
            f"invalid config: model config {path} does not exist (paths are relative to the working directory {Path.cwd()})"
        )
    with open(path) as f:
        model = yaml.safe_load(f)
    if not isinstance(model, dict) or not isinstance(model.get("depth"), int):
        raise ValueError(f"invalid config: model config {path} must be a mapping with an integer 'depth'")
    return model


def check_config(config, dryrun: bool) -> None:
    """Checks across keys and files, after the schema. Raises ValueError with one message."""
    sampling, diffusion, dataset = config["sampling"], config["diffusion"], config["dataset"]
    T = diffusion["num_timesteps"]

    if diffusion["beta_start"] >= diffusion["beta_end"]:
        raise ValueError(
            f"invalid config: diffusion.beta_start ({diffusion['beta_start']}) must be smaller than "
            f"diffusion.beta_end ({diffusion['beta_end']})"
        )
    if sampling["sampler"] == "ddpm":
        if sampling["steps"] != T:
            raise ValueError(
                f"invalid config: sampling.steps is {sampling['steps']}, but the ddpm sampler visits all "
                f"diffusion.num_timesteps = {T} steps; set sampling.steps: {T} or use sampler: ddim"
            )
        if sampling["eta"] != 0:
            raise ValueError(
                f"invalid config: sampling.eta is {sampling['eta']}; it applies to the ddim sampler only (use 0 with ddpm)"
            )
    elif sampling["steps"] > T:
        raise ValueError(
            f"invalid config: sampling.steps ({sampling['steps']}) must be in [1, diffusion.num_timesteps = {T}]"
        )
    # duodiff.sampling.CUDA_ONLY_PRECISIONS (the workflow does not import duodiff, see above).
    if sampling["precision"] in ("tf32", "fp16") and config["device"] != "cuda":
        raise ValueError(
            f"invalid config: sampling.precision {sampling['precision']} needs device: cuda (device is "
            f"{config['device']}); on the CPU use fp32 or bf16"
        )

    for steps in sampling["fewer_steps"]:
        if sampling["sampler"] == "ddpm" or not 1 <= steps < sampling["steps"]:
            raise ValueError(
                f"invalid config: sampling.fewer_steps {steps} must be in [1, sampling.steps = {sampling['steps']}) "
                "with the ddim sampler (the full model with fewer steps than the study's sets)"
            )
    for t_switch in config["duodiff"]["t_switch"]:
        if not 0 <= t_switch <= sampling["steps"]:
            raise ValueError(
                f"invalid config: duodiff.t_switch {t_switch} must be in [0, sampling.steps = {sampling['steps']}] "
                "(the number of noisiest sampling steps done by the shallow model)"
            )

    full_path = config["models"]["full"]
    full = read_model_config(full_path)
    for key, path in [("models.full", full_path)] + [("models.shallow", path) for path in config["models"]["shallow"]]:
        depth = read_model_config(path)["depth"]
        if depth < 1 or depth % 2 != 1:
            raise ValueError(
                f"invalid config: {key} {path} has depth {depth}; a U-ViT needs an odd depth (depth // 2 in-blocks, "
                "1 mid-block, depth // 2 out-blocks), e.g. "
                + " or ".join(str(d) for d in (depth - 1, depth + 1) if d > 0)
            )
    # The images the models are trained on and the FID reference is built from.
    name, native = dataset["name"], DATASET_NATIVE_SIZE[dataset["name"]]
    image_size = dataset["image_size"] if dataset["image_size"] is not None else native
    if image_size is None:
        raise ValueError(
            f"invalid config: dataset.image_size is null, but dataset {name} has no native size; set it to the "
            f"img_size of models.full {full_path} ({full.get('img_size')})"
        )
    if image_size != full.get("img_size"):
        given = (
            f"dataset.image_size is {image_size}"
            if dataset["image_size"] is not None
            else f"dataset {name} gives {native}x{native} images (dataset.image_size: null = its native size)"
        )
        raise ValueError(
            f"invalid config: models.full {full_path} has img_size {full.get('img_size')}, but {given}; set "
            f"dataset.image_size: {full.get('img_size')} or use a model config for {image_size}x{image_size} images"
        )
    if full.get("in_chans") != DATASET_CHANNELS[name]:
        raise ValueError(
            f"invalid config: models.full {full_path} has in_chans {full.get('in_chans')}, but dataset {name} has "
            f"{DATASET_CHANNELS[name]} channel(s); use a model config with in_chans: {DATASET_CHANNELS[name]}"
        )
    depths = {}
    for path in config["models"]["shallow"]:
        shallow = read_model_config(path)
        for key in SHARED_MODEL_KEYS:
            if shallow.get(key) != full.get(key):
                raise ValueError(
                    f"invalid config: models.shallow {path} has {key} {shallow.get(key)!r} but models.full "
                    f"{full_path} has {full.get(key)!r}; a DuoDiff shallow model must match the full model's "
                    f"{', '.join(SHARED_MODEL_KEYS)}"
                )
        if shallow["depth"] >= full["depth"]:
            raise ValueError(
                f"invalid config: models.shallow {path} has depth {shallow['depth']}, but a DuoDiff shallow model "
                f"must be shallower than models.full {full_path} (depth {full['depth']}); were the two swapped?"
            )
        if shallow["depth"] in depths:
            raise ValueError(
                f"invalid config: models.shallow {path} and {depths[shallow['depth']]} both have depth "
                f"{shallow['depth']}; sample sets are named by depth (shallow_d<depth>), so depths must differ"
            )
        depths[shallow["depth"]] = path

    if dataset["download"] and name not in DOWNLOADABLE:
        raise ValueError(
            f"invalid config: dataset.download is true, but {name} cannot be downloaded "
            f"(only {', '.join(DOWNLOADABLE)}); put the images in dataset.root"
        )
    if name in NEEDS_ROOT and not dataset["download"]:
        root = dataset["root"] or f"data/{name}"  # duodiff.data's default root
        if not Path(root).exists():
            message = f"dataset.root {root} does not exist for dataset {name}; put the data there" + (
                " or set dataset.download: true" if name in DOWNLOADABLE else ""
            )
            if not dryrun:
                raise ValueError(f"invalid config: {message}")
            # A dry run only plans: let users inspect the jobs before the data is in place.
            logger.warning(f"Warning: {message}. The real run stops here until it does.")


def check_headline(config) -> None:
    """metrics.headline classifier trains a small classifier on the dataset (rule feature_net)."""
    dataset = config["dataset"]
    if config["metrics"]["headline"] == "classifier" and (
        dataset["name"] not in LABELLED_SMALL or (dataset["image_size"] or 0) > 32
    ):
        raise ValueError(
            f"invalid config: metrics.headline classifier trains a small classifier on the dataset, which needs class "
            f"labels and images of at most 32 px (datasets {', '.join(LABELLED_SMALL)}); dataset {dataset['name']} "
            "does not qualify: use metrics.headline: inception"
        )


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
    sets = ["full"]
    sets += [f"full_steps{steps}" for steps in sorted(config["sampling"]["fewer_steps"], reverse=True)]
    sets += [f"shallow_d{depth}" for depth in shallow_depths()]
    sets += [
        f"ee_{classifier}_thr{threshold_label(threshold)}"
        for classifier in config["early_exit"]["classifier_types"]
        for threshold in config["early_exit"]["thresholds"]
    ]
    sets += [f"duodiff_d{depth}_ts{t}" for depth in shallow_depths() for t in config["duodiff"]["t_switch"]]
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


def sample_outputs(set_name, method):
    outputs = {kind: set_file(kind, set_name) for kind in SET_FILES}
    outputs["grid"] = report(
        outputs["grid"],
        caption="../report/grid.rst",
        category="4. Samples",  # after the plots and tables (report.smk)
        subcategory=method,
        labels={"set": set_name, "method": method},
    )
    return outputs


def study_files(kind):
    """The per-set (or per-model) files of the configured study that the tables and plots read:
    the outputs of the rules that write them, for every set (or model) of the configured grid."""
    experiment = config["experiment"]
    if kind == "losses":  # one per trained model
        return (
            expand(rules.train_full.output.loss, experiment=experiment)
            + expand(rules.train_shallow.output.loss, experiment=experiment, depth=list(shallow_depths()))
            + expand(
                rules.train_early_exit.output.loss,
                experiment=experiment,
                classifier_type=config["early_exit"]["classifier_types"],
            )
        )
    if kind == "fd_classifier" and config["metrics"]["headline"] != "classifier":
        return []
    if kind == "cmmd" and not config["metrics"]["cmmd"]["enabled"]:
        return []
    patterns = {
        "stats": set_file("stats"),
        "exit_layers": set_file("exit_layers"),
        "grids": set_file("grid"),
        "fid": rules.fid.output,
        "fd_classifier": rules.fd_classifier.output,
        "cmmd": rules.cmmd.output,
        "gflops": rules.flops.output,
    }
    # Scores cover the real images too; sampling cost and exits exist for generated sets only.
    sets = scored_sets() if kind in ("fid", "fd_classifier", "cmmd") else sample_sets()
    return expand(patterns[kind], experiment=experiment, set=sets)


# ---- flags ----------------------------------------------------------------------------------------


def cli_flags(settings: dict) -> str:
    """{'n_steps': 10, 'use_amp': True, 'root': None} -> '--n-steps 10 --use-amp'.

    Config keys are named like the `duodiff` flags, so each setting reaches the command under
    its own name; true booleans become switches, false ones and None are left out. Flags come
    sorted by name: the string is a rule's params, and the same settings written in another
    order in the YAML must not look like a change (that would retrain everything)."""
    parts = []
    for key, value in sorted(settings.items()):
        flag = f"--{key.replace('_', '-')}"
        if value is None or value is False:
            continue
        if value is True:
            parts.append(flag)
        else:
            parts.append(f"{flag} {shlex.quote(str(value))}")
    return " ".join(parts)


def dataset_flags() -> str:
    dataset = config["dataset"]
    return cli_flags(
        {
            "dataset": dataset["name"],
            "data_root": dataset["root"],
            "download": dataset["download"],
            "image_size": dataset["image_size"],
        }
    )


def train_flags(stage: str) -> str:
    """Every `duodiff train` setting of train.<stage>, plus dataset, diffusion and device."""
    return " ".join(
        [
            dataset_flags(),
            cli_flags(config["diffusion"]),
            cli_flags(config["train"][stage]),
            cli_flags({"device": config["device"]}),
        ]
    )


def sampling_flags(steps=None) -> str:
    """The `duodiff sample` settings of config `sampling`; `steps` overrides its steps (fewer steps)."""
    sampling = config["sampling"]
    settings = {
        key: sampling[key] for key in ("sampler", "steps", "eta", "n_samples", "batch_size", "seed", "precision")
    }
    if steps is not None:
        settings["steps"] = steps
    settings["no_ema"] = not sampling["use_ema"]
    settings["device"] = config["device"]
    return cli_flags(settings)


def reference_flags() -> str:
    metrics = config["metrics"]
    settings = {
        "n_reference": config["reference"]["n_reference"],
        "batch_size": metrics["fid"]["batch_size"],
        "feature_network": metrics["feature_network"],
        "num_workers": metrics["num_workers"],
        "device": config["device"],
    }
    return " ".join([dataset_flags(), cli_flags(settings)])


def fid_flags() -> str:
    metrics = config["metrics"]
    settings = {**metrics["fid"], "no_intervals": not metrics["intervals"]}
    return cli_flags({**settings, "num_workers": metrics["num_workers"], "device": config["device"]})


def fd_classifier_flags() -> str:
    """`duodiff fid --feature-net`: every image of the set (max_samples is Inception's budget)."""
    metrics = config["metrics"]
    settings = {key: value for key, value in metrics["fid"].items() if key != "max_samples"}
    settings["no_intervals"] = not metrics["intervals"]
    return cli_flags({**settings, "num_workers": metrics["num_workers"], "device": config["device"]})


def feature_net_flags() -> str:
    return " ".join([dataset_flags(), cli_flags(config["metrics"]["classifier"])])


def real_set_flags() -> str:
    reference = config["reference"]
    return " ".join(
        [dataset_flags(), cli_flags({"n_reference": reference["n_reference"], "n_images": reference["n_real"]})]
    )


def cmmd_flags() -> str:
    settings = {key: value for key, value in config["metrics"]["cmmd"].items() if key != "enabled"}
    return cli_flags({**settings, "device": config["device"]})


def resources(kind: str) -> dict:
    return config["resources"][kind]
