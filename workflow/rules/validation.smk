# The config checks, which the Snakefile runs before it defines the rules. The schema's error
# becomes one line naming the key (schema_error_message); then come the checks across keys and
# files that JSON schema cannot express (check_config, check_headline). Each raises ValueError
# with one message.
#
# Nothing here imports duodiff (see common.smk): the dataset tables below are copies of
# duodiff.core.data's, which tests/test_workflow.py keeps in step.

import functools
import json
from pathlib import Path

import yaml

with open(Path(workflow.basedir, "schemas", "config.schema.yaml")) as _f:
    SCHEMA = yaml.safe_load(_f)

# Datasets torchvision can download; the others must already be in dataset.root.
DOWNLOADABLE = ("cifar10", "celeba")
# Datasets that read files (digits ships with scikit-learn).
NEEDS_ROOT = ("cifar10", "celeba", "imagenet64", "imagenet256", "imagefolder")
# Datasets with class labels and small native images, on which metrics.headline classifier can
# train its feature network (duodiff.core.data.NUM_CLASSES and NATIVE_SIZE).
LABELLED_SMALL = ("digits", "cifar10")
# A shallow model replaces the full one for the first t_switch steps on the same images
# (and the same class labels), so these must agree between the two.
SHARED_MODEL_KEYS = ("img_size", "patch_size", "in_chans", "num_classes")
# duodiff.core.data.NATIVE_SIZE and CHANNELS (tests/test_workflow.py keeps them in step): each dataset's
# image size when dataset.image_size is null (None: it has no native size) and its channel count.
DATASET_NATIVE_SIZE = {
    "digits": 8,
    "cifar10": 32,
    "celeba": 64,
    "imagenet64": 64,
    "imagenet256": 256,
    "imagefolder": None,
}
DATASET_CHANNELS = {"digits": 1, "cifar10": 3, "celeba": 3, "imagenet64": 3, "imagenet256": 3, "imagefolder": 3}


# ---- schema errors -----------------------------------------------------------------------------


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
    node, description = SCHEMA, None
    for part in schema_path:
        while isinstance(node, dict) and part not in node and "$ref" in node:
            node = functools.reduce(lambda n, name: n[name], node["$ref"].removeprefix("#/").split("/"), SCHEMA)
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            break
        if isinstance(node, dict) and "description" in node:
            description = node["description"]
    return description


# ---- checks across keys and files ------------------------------------------------------------------


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
    """Checks across keys and files, after the schema, in this order: the sampling grid, the
    models against each other and the dataset, then where the data comes from."""
    _check_sampling(config)
    full_path = config["models"]["full"]
    full = read_model_config(full_path)
    _check_depths(config)
    if config["autoencoder"]["path"] is None:
        _check_pixel_space(config["autoencoder"])
        _check_full_model_fits_dataset(config["dataset"], full_path, full)
    else:  # latent diffusion: the models see the autoencoder's latents of the dataset's images
        _check_full_model_fits_latents(config, full_path, full, dryrun)
    _check_shallow_models(config["models"]["shallow"], full_path, full)
    _check_cache(config["cache"], full_path, full)
    _check_guidance(config, full_path, full)
    _check_composed(config)  # after the models' checks: it reads the shallow depths
    _check_data_source(config["dataset"], dryrun)
    _check_trained_in(config["models"]["trained_in"], config["experiment"])


def _check_sampling(config) -> None:
    sampling, diffusion = config["sampling"], config["diffusion"]
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
    elif sampling["steps"] > T:
        raise ValueError(
            f"invalid config: sampling.steps ({sampling['steps']}) must be in [1, diffusion.num_timesteps = {T}]"
        )
    if sampling["sampler"] == "euler_maruyama" and diffusion["noise_process"] != "vp_sde":
        raise ValueError(
            f"invalid config: sampling.sampler euler_maruyama integrates the continuous VP-SDE, but "
            f"diffusion.noise_process is {diffusion['noise_process']!r}; set diffusion.noise_process: vp_sde "
            "(U-ViT's CIFAR-10 / CelebA recipe) or use ddpm, ddim, dpm_solver or dpm_solver_fast"
        )
    if sampling["sampler"] != "ddim" and sampling["eta"] != 0:
        raise ValueError(
            f"invalid config: sampling.eta is {sampling['eta']}; it applies to the ddim sampler only "
            f"(use 0 with {sampling['sampler']})"
        )
    # duodiff.core.study.CUDA_ONLY_PRECISIONS (the workflow does not import duodiff, see above).
    if sampling["precision"] in ("tf32", "fp16") and config["device"] != "cuda":
        raise ValueError(
            f"invalid config: sampling.precision {sampling['precision']} needs device: cuda (device is "
            f"{config['device']}); on the CPU use fp32 or bf16"
        )
    for steps in sampling["fewer_steps"]:
        if sampling["sampler"] == "ddpm" or not 1 <= steps < sampling["steps"]:
            raise ValueError(
                f"invalid config: sampling.fewer_steps {steps} must be in [1, sampling.steps = {sampling['steps']}) "
                "with any sampler but ddpm (the full model with fewer steps than the study's sets)"
            )
    if config["search"]["enabled"] and not config["metrics"]["intervals"]:
        raise ValueError(
            "invalid config: search.enabled needs metrics.intervals: true (the search judges each probe by "
            "its paired 95% interval); set search.enabled: false or metrics.intervals: true"
        )
    for interval in config["cache"]["interval"]:
        if interval > sampling["steps"]:
            raise ValueError(
                f"invalid config: cache.interval {interval} must be in [1, sampling.steps = {sampling['steps']}] "
                "(the steps from one full network pass to the next)"
            )
    if config["learning_to_cache"]["thresholds"] and sampling["steps"] < 2:
        raise ValueError(
            "invalid config: learning_to_cache needs sampling.steps >= 2 (step 0 never caches; the router "
            f"gates steps 1, 3, ...); got {sampling['steps']}"
        )
    for t_switch in config["duodiff"]["t_switch"]:
        if not 0 <= t_switch <= sampling["steps"]:
            raise ValueError(
                f"invalid config: duodiff.t_switch {t_switch} must be in [0, sampling.steps = {sampling['steps']}] "
                "(the number of noisiest sampling steps done by the shallow model)"
            )


# A composed entry's swept knob and what each ingredient needs (common.smk builds its sets).
COMPOSED_KNOBS = ("t_switch", "threshold", "cache_interval", "steps")
COMPOSED_PAIRS = {"duodiff": "t_switch", "early_exit": "threshold", "cache_interval": "cache_keep"}


def _check_composed(config) -> None:
    """Each composed entry: two ingredients or more, exactly one knob a list, every value one the
    study can sample (a trained shallow depth and classifier type, steps below sampling.steps,
    t_switch within the entry's steps)."""
    study_steps = config["sampling"]["steps"]
    depths = sorted(read_model_config(path)["depth"] for path in config["models"]["shallow"])
    classifiers = config["early_exit"]["classifier_types"]
    for i, entry in enumerate(config["composed"]):
        where = f"invalid config: composed[{i}]"
        for ingredient, knob in COMPOSED_PAIRS.items():
            if (ingredient in entry) != (knob in entry):
                raise ValueError(f"{where}: {ingredient} and {knob} go together (give both or neither)")
        ingredients = [key for key in ("duodiff", "early_exit", "cache_interval", "steps") if key in entry]
        if len(ingredients) < 2:
            raise ValueError(
                f"{where}: combines {' '.join(ingredients) or 'nothing'}; a composed entry needs two or more of "
                "duodiff (+ t_switch), early_exit (+ threshold), cache_interval (+ cache_keep), steps (one alone "
                "is early_exit, duodiff, cache or sampling.fewer_steps)"
            )
        if "cache_interval" in entry and ingredients != ["duodiff", "cache_interval"]:
            raise ValueError(
                f"{where}: cache_interval composes with duodiff alone (caching the full model's phase); got it with "
                f"{', '.join(key for key in ingredients if key != 'cache_interval')}"
            )
        if "cache_keep" in entry:
            full_depth = read_model_config(config["models"]["full"])["depth"]
            if entry["cache_keep"] > full_depth // 2:
                raise ValueError(
                    f"{where}: cache_keep {entry['cache_keep']} must be in [1, {full_depth // 2}] (depth // 2 of "
                    f"models.full, depth {full_depth})"
                )
        lists = [knob for knob in COMPOSED_KNOBS if isinstance(entry.get(knob), list)]
        if len(lists) != 1:
            raise ValueError(
                f"{where}: exactly one of {', '.join(k for k in COMPOSED_KNOBS if k in entry)} must be a list (the "
                f"swept knob); got {len(lists)}{': ' + ', '.join(lists) if lists else ''}"
            )
        if "duodiff" in entry and entry["duodiff"] not in depths:
            raise ValueError(f"{where}: duodiff {entry['duodiff']} is not a shallow depth of models.shallow ({depths})")
        if "early_exit" in entry and entry["early_exit"] not in classifiers:
            raise ValueError(
                f"{where}: early_exit {entry['early_exit']!r} is not one of early_exit.classifier_types ({', '.join(classifiers)})"
            )
        steps = entry.get("steps", study_steps)
        for value in steps if isinstance(steps, list) else [steps]:
            if "steps" in entry and (config["sampling"]["sampler"] == "ddpm" or not 1 <= value < study_steps):
                raise ValueError(
                    f"{where}: steps {value} must be in [1, sampling.steps = {study_steps}) with any sampler but "
                    "ddpm (at sampling.steps, leave steps out)"
                )
        fewest = min(steps if isinstance(steps, list) else [steps])  # t_switch must fit every set's steps
        t_switch = entry.get("t_switch", [])
        for value in t_switch if isinstance(t_switch, list) else [t_switch]:
            if value > fewest:
                raise ValueError(f"{where}: t_switch {value} must be in [0, {fewest}] (the entry's steps)")


def _check_depths(config) -> None:
    models = config["models"]
    for key, path in [("models.full", models["full"])] + [("models.shallow", path) for path in models["shallow"]]:
        depth = read_model_config(path)["depth"]
        if depth < 1 or depth % 2 != 1:
            raise ValueError(
                f"invalid config: {key} {path} has depth {depth}; a U-ViT needs an odd depth (depth // 2 in-blocks, "
                "1 mid-block, depth // 2 out-blocks), e.g. "
                + " or ".join(str(d) for d in (depth - 1, depth + 1) if d > 0)
            )


def _dataset_image_size(dataset, full_path, full) -> int:
    name, native = dataset["name"], DATASET_NATIVE_SIZE[dataset["name"]]
    image_size = dataset["image_size"] if dataset["image_size"] is not None else native
    if image_size is None:
        raise ValueError(
            f"invalid config: dataset.image_size is null, but dataset {name} has no native size; set it to the "
            f"img_size of models.full {full_path} ({full.get('img_size')})"
        )
    return image_size


def _check_full_model_fits_dataset(dataset, full_path, full) -> None:
    """The images the models are trained on and the FID reference is built from."""
    name, native = dataset["name"], DATASET_NATIVE_SIZE[dataset["name"]]
    image_size = _dataset_image_size(dataset, full_path, full)
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


def _check_pixel_space(autoencoder) -> None:
    if autoencoder["config"] is not None:
        raise ValueError(
            f"invalid config: autoencoder.config is {autoencoder['config']}, but autoencoder.path is null (pixel "
            "space); set autoencoder.path to the autoencoder the config describes, or remove autoencoder.config"
        )


def autoencoder_architecture(autoencoder) -> dict | None:
    """The diffusers config of autoencoder.path (autoencoder.config, or a folder's config.json);
    None while it cannot be read (a dry run before the files are in place)."""
    path = Path(autoencoder["path"])
    if autoencoder["config"] is not None:
        if not Path(autoencoder["config"]).is_file():
            raise ValueError(f"invalid config: autoencoder.config {autoencoder['config']} does not exist")
        architecture = Path(autoencoder["config"])
    elif path.is_file():
        raise ValueError(
            f"invalid config: autoencoder.path {path} is a single checkpoint file; set autoencoder.config to its "
            "architecture (config/autoencoders/sd-kl-f8.json for Stable Diffusion's KL-f8)"
        )
    else:
        architecture = path / "config.json"
    if not architecture.is_file():
        return None
    with open(architecture) as f:
        return json.load(f)


def _check_full_model_fits_latents(config, full_path, full, dryrun: bool) -> None:
    """The models work on the latents of the dataset's images: the autoencoder's latent channels,
    and the image size over its downsampling (diffusers' AutoencoderKL defaults where unset)."""
    autoencoder, dataset = config["autoencoder"], config["dataset"]
    if not Path(autoencoder["path"]).exists():
        message = f"autoencoder.path {autoencoder['path']} does not exist; put the autoencoder there"
        if not dryrun:
            raise ValueError(f"invalid config: {message}")
        logger.warning(f"Warning: {message}. The real run stops here until it does.")
    architecture = autoencoder_architecture(autoencoder)
    if architecture is None:
        return
    image_size = _dataset_image_size(dataset, full_path, full)
    channels = architecture.get("latent_channels", 4)
    factor = 2 ** (len(architecture.get("block_out_channels", [64])) - 1)
    if architecture.get("in_channels", 3) != DATASET_CHANNELS[dataset["name"]]:
        raise ValueError(
            f"invalid config: the autoencoder encodes {architecture.get('in_channels', 3)}-channel images, but dataset "
            f"{dataset['name']} has {DATASET_CHANNELS[dataset['name']]} channel(s)"
        )
    if (full.get("in_chans"), full.get("img_size")) != (channels, image_size // factor) or image_size % factor:
        raise ValueError(
            f"invalid config: models.full {full_path} has in_chans {full.get('in_chans')}, img_size "
            f"{full.get('img_size')}, but the autoencoder turns {image_size}x{image_size} images into {channels} "
            f"latent channels downsampled {factor}x; use a model config with in_chans: {channels}, img_size: "
            f"{image_size // factor} (and an image size divisible by {factor})"
        )


def _check_cache(cache, full_path, full) -> None:
    """Caching keeps keep_blocks blocks at each end of the full model and must leave the mid block
    (at least) to the cache: keep_blocks <= depth // 2."""
    half = full["depth"] // 2
    if cache["interval"] and cache["keep_blocks"] > half:
        raise ValueError(
            f"invalid config: cache.keep_blocks {cache['keep_blocks']} must be in [1, {half}]: models.full {full_path} "
            f"has depth {full['depth']} ({half} in-blocks, the mid block, {half} out-blocks)"
        )


def _check_shallow_models(shallow_paths, full_path, full) -> None:
    depths = {}
    for path in shallow_paths:
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


def _check_guidance(config, full_path, full) -> None:
    """Label dropout gives the models their null class (the last class token), guidance needs it.
    The shallow models share the full model's num_classes and the early-exit models its backbone,
    so the three trainings drop labels or not together: the exit heads serve the unconditional
    branch too."""
    dropout = {stage: config["train"][stage]["label_dropout"] for stage in ("full", "shallow", "early_exit")}
    num_classes = full.get("num_classes", 0)
    if any(p > 0 for p in dropout.values()) and num_classes == 0:
        raise ValueError(
            f"invalid config: train.*.label_dropout is set ({', '.join(f'{k} {v}' for k, v in dropout.items())}), but "
            f"models.full {full_path} has num_classes 0: label dropout needs a class-conditional model"
        )
    if len({p > 0 for p in dropout.values()}) > 1:
        raise ValueError(
            f"invalid config: train.full, train.shallow and train.early_exit must all drop labels or none "
            f"(label_dropout {', '.join(f'{k} {v}' for k, v in dropout.items())}): they share the null class"
        )
    scale = config["sampling"]["guidance_scale"]
    if scale != 0 and (num_classes == 0 or dropout["full"] == 0):
        raise ValueError(
            f"invalid config: sampling.guidance_scale is {scale}, which needs class-conditional models with a null "
            f"class: models.full {full_path} has num_classes {num_classes} and train.full.label_dropout "
            f"{dropout['full']}; set train.*.label_dropout > 0 (with models.full_checkpoint: the published model's, "
            "U-ViT's ImageNet 256 0.15) and num_classes = the dataset's classes + 1"
        )


def _check_data_source(dataset, dryrun: bool) -> None:
    name = dataset["name"]
    if dataset["download"] and name not in DOWNLOADABLE:
        raise ValueError(
            f"invalid config: dataset.download is true, but {name} cannot be downloaded "
            f"(only {', '.join(DOWNLOADABLE)}); put the images in dataset.root"
        )
    if name in NEEDS_ROOT and not dataset["download"]:
        root = dataset["root"] or f"data/{name}"  # duodiff.core.data's default root
        if not Path(root).exists():
            message = f"dataset.root {root} does not exist for dataset {name}; put the data there" + (
                " or set dataset.download: true" if name in DOWNLOADABLE else ""
            )
            if not dryrun:
                raise ValueError(f"invalid config: {message}")
            # A dry run only plans: let users inspect the jobs before the data is in place.
            logger.warning(f"Warning: {message}. The real run stops here until it does.")


def _check_trained_in(source, experiment) -> None:
    """A variant samples another study's models, laid over that study's config; it cannot be its
    own source (its sets and the models would share one folder and nothing would say which is which)."""
    if source is not None and source == experiment:
        raise ValueError(
            f"invalid config: models.trained_in is {source!r}, the experiment itself; name the study whose "
            "models a variant samples, and give the variant an experiment name of its own"
        )


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


def check_fid_protocol(config, dryrun: bool) -> None:
    """A reference from published statistics (reference.statistics) holds mu and sigma only; an
    Inception budget (metrics.fid.max_reference) takes part of the reference's images."""
    statistics = config["reference"]["statistics"]
    max_reference, n_reference = config["metrics"]["fid"]["max_reference"], config["reference"]["n_reference"]
    if max_reference is not None and statistics is not None:
        raise ValueError(
            f"invalid config: metrics.fid.max_reference {max_reference} limits the reference images Inception sees, "
            f"but reference.statistics {statistics} has no images: set metrics.fid.max_reference: null"
        )
    if max_reference is not None and max_reference > n_reference:
        raise ValueError(
            f"invalid config: metrics.fid.max_reference {max_reference} is more than reference.n_reference "
            f"{n_reference}, the reference's images: at most {n_reference}, or null for all of them"
        )
    if statistics is None:
        return
    if config["metrics"]["headline"] != "inception":
        raise ValueError(
            f"invalid config: reference.statistics {statistics} holds only mu and sigma, but metrics.headline "
            f"{config['metrics']['headline']} scores the reference's images: use metrics.headline: inception, or "
            "reference.statistics: null to build the reference from the dataset's images"
        )
    if config["metrics"]["cmmd"]["enabled"]:
        raise ValueError(
            f"invalid config: reference.statistics {statistics} holds no images, which CMMD's reference embeds: "
            "set metrics.cmmd.enabled: false, or reference.statistics: null"
        )
    if not Path(statistics).is_file():
        message = f"reference.statistics {statistics} does not exist; put the npz (mu, sigma) there"
        if not dryrun:
            raise ValueError(f"invalid config: {message}")
        logger.warning(f"Warning: {message}. The real run stops here until it does.")


def check_full_checkpoint(config) -> None:
    """What a U-ViT checkpoint needs of the config, refused before any job starts (duodiff
    convert checks the same; the workflow does not import duodiff, see above)."""
    full_path, diffusion = config["models"]["full"], config["diffusion"]
    if read_model_config(full_path).get("normalize_timesteps", False):
        raise ValueError(
            f"invalid config: models.full_checkpoint is set, but models.full {full_path} has normalize_timesteps: "
            "true; U-ViT's checkpoints see the raw step (t * 999): use a model file with normalize_timesteps: false"
        )
    if diffusion["num_timesteps"] != 1000 or diffusion["parametrization"] != "predict_noise":
        raise ValueError(
            f"invalid config: models.full_checkpoint is set, but diffusion has num_timesteps {diffusion['num_timesteps']} "
            f"and parametrization {diffusion['parametrization']}; U-ViT's checkpoints need 1000 and predict_noise"
        )
    _check_checkpoint_recipe(config)


# U-ViT's recipes (duodiff.models.convert.UVIT_RECIPES; the workflow does not import duodiff, see above).
UVIT_SDE = {"sde_beta_min": 0.1, "sde_beta_max": 20.0}
UVIT_DISCRETE_LATENT = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def _check_checkpoint_recipe(config) -> None:
    """The noise process, time input and sampler must be those a U-ViT checkpoint was trained for:
    the continuous VP-SDE (beta 0.1 -> 20) fed t * 999 (U-ViT's pixel models and ImageNet 256 L/2),
    the discrete scaled-linear process 0.00085 -> 0.012 fed n = index + 1 (its discrete latent
    models, H/2), or, for a pixel checkpoint, the documented approximation of its VP-SDE on the
    discrete linear schedule fed the 0-based step (config/README.md, `full_checkpoint`)."""
    diffusion, sampler = config["diffusion"], config["sampling"]["sampler"]
    process, time_input = diffusion["noise_process"], diffusion["time_input"]
    latent = config["autoencoder"]["path"] is not None
    prefix = f"invalid config: models.full_checkpoint is set with diffusion.noise_process {process}"
    if sampler == "euler_maruyama" and process != "vp_sde":  # _check_sampling says so first; kept for the pair
        raise ValueError(f"{prefix}, but sampling.sampler euler_maruyama needs noise_process vp_sde")
    if process == "vp_sde":
        if time_input != "t_times_999":
            raise ValueError(
                f"{prefix}, but diffusion.time_input is {time_input!r}; U-ViT's continuous checkpoints see t * 999: "
                "allowed: t_times_999"
            )
        for key, value in UVIT_SDE.items():
            if float(diffusion[key]) != value:
                raise ValueError(
                    f"{prefix}, but diffusion.{key} is {diffusion[key]}; U-ViT's VP-SDE has {key} {value}: allowed: {value}"
                )
    elif latent:
        if time_input != "index_plus_one":
            raise ValueError(
                f"{prefix} in latent space, but diffusion.time_input is {time_input!r}; U-ViT's discrete latent "
                "checkpoints (ImageNet 256/512 H) see n = index + 1: allowed: index_plus_one (or noise_process vp_sde "
                "with t_times_999 for its continuous ones)"
            )
        for key, value in UVIT_DISCRETE_LATENT.items():
            if diffusion[key] != value:
                raise ValueError(
                    f"{prefix} in latent space, but diffusion.{key} is {diffusion[key]}; U-ViT's discrete latent "
                    f"checkpoints use Stable Diffusion's schedule: allowed: {key} {value}"
                )
    else:
        if time_input != "index" or diffusion["beta_schedule"] != "linear":
            raise ValueError(
                f"{prefix} in pixel space, but diffusion.time_input is {time_input!r} and diffusion.beta_schedule "
                f"{diffusion['beta_schedule']!r}; U-ViT's pixel checkpoints are continuous: allowed: noise_process vp_sde "
                "with time_input t_times_999 (their recipe), or the discrete approximation with time_input index and "
                "beta_schedule linear"
            )
