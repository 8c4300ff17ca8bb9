"""The study's vocabulary: methods, samplers, precisions, classifier types, sample-set names and
the label of a set's swept setting. One definition for the package; sampling, flops, tables,
plots and the models import it.

A leaf module: it imports no duodiff stage. The workflow keeps its own copy (it must not import
the package: workflow/rules/common.smk reads the schema's enums and builds the set names itself);
tests/test_vocabulary.py keeps the two in step.
"""

from __future__ import annotations

import re

from duodiff.core.errors import DuodiffError

# What `duodiff sample --method` runs and stats.json records (docs/architecture.md).
METHODS = ("full", "shallow", "early_exit", "duodiff", "cache", "l2c")
# The methods of the tables' rows, in the papers' order: the sampling methods, the held-out real
# images, and the full model sampled with fewer steps.
# Composed sets (several families in one policy: fewer steps, DuoDiff's shallow phase, early exit
# inside the full model) are one method, whatever they combine.
METHOD_ORDER = ("real", "full", "fewer_steps", "shallow", "early_exit", "duodiff", "cache", "l2c", "composed")
# The method a set's stats.json records (what `duodiff sample --method` runs) when it differs from
# the set's own method, by the form of its name (SET_NAME_TEMPLATES; stats_method).
STATS_METHOD = {
    "fewer_steps": "full",
    "early_exit_steps": "early_exit",
    "duodiff_steps": "duodiff",
    "duodiff_early_exit": "duodiff",
    "duodiff_early_exit_steps": "duodiff",
    "duodiff_cache": "duodiff",
}
# The setting each swept method varies from set to set.
# cache: the interval N between full steps (cache_keep, the blocks run at each end, is fixed per family).
# l2c: the router's threshold (one router per study: the sampler and steps it was trained for).
SWEPT_SETTING = {"early_exit": "threshold", "duodiff": "t_switch", "cache": "cache_interval",
                 "l2c": "router_threshold"}

# ddpm: every timestep; ddim and dpm_solver (DPM-Solver++ 2M, this project's): `steps` of them;
# dpm_solver_fast (U-ViT's ImageNet sampler) and euler_maruyama (U-ViT's CIFAR-10 / CelebA one): `steps`
# network evaluations at continuous times.
SAMPLERS = ("ddpm", "ddim", "dpm_solver", "dpm_solver_fast", "euler_maruyama")
# Arithmetic of the network evaluations (the sampler's own updates stay float32):
# fp32 everywhere; tf32 lets CUDA matmuls and convolutions round their inputs to TF32; bf16 and
# fp16 run them under torch.autocast, as mixed-precision inference usually does.
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
CUDA_ONLY_PRECISIONS = ("tf32", "fp16")
# The early-exit models' uncertainty probes (duodiff.models.early_exit).
CLASSIFIER_TYPES = (
    "attention_probe",
    "mlp_probe_per_layer",
    "mlp_probe_per_timestep",
    "mlp_probe_per_layer_per_timestep",
)

# ---- sample-set names ------------------------------------------------------------------------
# Also the folder names (docs/architecture.md, "Tables and plots"). One template per form of name;
# a form is a method's own name, or one of the composed forms (method "composed": FORM_METHOD).
# Each name parses one way only: no field pattern holds an underscore, so a composed name never
# matches a plain form's pattern (fullmatch) and the forms differ in their literal parts.
THRESHOLD_PATTERN = r"\d+(?:\.\d+)?(?:e-\d+)?"
FIELD_PATTERNS = {
    "steps": r"\d+",
    "depth": r"\d+",
    "t_switch": r"\d+",
    "classifier_type": "|".join(CLASSIFIER_TYPES),
    "threshold": THRESHOLD_PATTERN,
    "cache_interval": r"\d+",
    "cache_keep": r"\d+",
    "router_threshold": THRESHOLD_PATTERN,
}
SET_NAME_TEMPLATES = {
    "real": "real",
    "full": "full",
    "fewer_steps": "full_steps{steps}",
    "shallow": "shallow_d{depth}",
    "early_exit": "ee_{classifier_type}_thr{threshold}",
    "duodiff": "duodiff_d{depth}_ts{t_switch}",
    # DeepCache-style caching: the whole network every N steps, k blocks at each end in between
    "cache": "cache_N{cache_interval}_k{cache_keep}",
    # Learning-to-Cache: the trained router, layers whose gate is at most the threshold reuse
    "l2c": "l2c_thr{router_threshold}",
    # composed: early exit at fewer steps; DuoDiff at fewer steps; DuoDiff whose full-model phase
    # runs the early-exit model with its exit rule (at the study's steps, or fewer).
    "early_exit_steps": "ee_{classifier_type}_thr{threshold}_steps{steps}",
    "duodiff_steps": "duodiff_d{depth}_ts{t_switch}_steps{steps}",
    "duodiff_early_exit": "duodiff_d{depth}_ts{t_switch}_ee_{classifier_type}_thr{threshold}",
    "duodiff_early_exit_steps": "duodiff_d{depth}_ts{t_switch}_ee_{classifier_type}_thr{threshold}_steps{steps}",
    # DuoDiff whose full-model phase is cached (the whole network every N steps of that phase)
    "duodiff_cache": "duodiff_d{depth}_ts{t_switch}_cache_N{cache_interval}_k{cache_keep}",
}
COMPOSED_FORMS = ("early_exit_steps", "duodiff_steps", "duodiff_early_exit", "duodiff_early_exit_steps", "duodiff_cache")
FORM_METHOD = {form: ("composed" if form in COMPOSED_FORMS else form) for form in SET_NAME_TEMPLATES}


def _template_regex(template: str) -> re.Pattern:
    return re.compile(re.sub(r"\{(\w+)\}", lambda m: f"(?P<{m[1]}>{FIELD_PATTERNS[m[1]]})", template))


SET_NAME_PATTERNS = {form: _template_regex(template) for form, template in SET_NAME_TEMPLATES.items()}
SET_NAME_FORMS = ", ".join(re.sub(r"\{(\w+)\}", r"<\1>", t) for t in SET_NAME_TEMPLATES.values())


def threshold_label(value) -> str:
    """The threshold as it appears in set names: Python's shortest round-trip float text
    (0.1 -> '0.1', 0.05 -> '0.05', 1 -> '1.0'), so two different thresholds never share a name."""
    return repr(float(value))


def set_name(method: str, **fields) -> str:
    """The name of a set: set_name("duodiff", depth=3, t_switch=10) -> 'duodiff_d3_ts10'. A
    composed set's form is the one whose fields are those given:
    set_name("composed", classifier_type="attention_probe", threshold=0.2, steps=30)
    -> 'ee_attention_probe_thr0.2_steps30'."""
    if "threshold" in fields:
        fields = {**fields, "threshold": threshold_label(fields["threshold"])}
    if "router_threshold" in fields:
        fields = {**fields, "router_threshold": threshold_label(fields["router_threshold"])}
    return SET_NAME_TEMPLATES[name_form(method, fields)].format(**fields)


def name_form(method: str, fields) -> str:
    """The form (a key of SET_NAME_TEMPLATES) of a set of `method` with these fields."""
    if method != "composed":
        return method
    for form in COMPOSED_FORMS:
        if set(re.findall(r"\{(\w+)\}", SET_NAME_TEMPLATES[form])) == set(fields):
            return form
    raise DuodiffError(f"no composed set has exactly the fields {sorted(fields)} (forms: {', '.join(COMPOSED_FORMS)})")


def parse_set_form(name: str) -> tuple[str, dict[str, str]]:
    """-> (form, {field: text}) of a set name; DuodiffError for a name of no known form."""
    for form, pattern in SET_NAME_PATTERNS.items():
        match = pattern.fullmatch(name)
        if match:
            return form, match.groupdict()
    raise DuodiffError(f"sample set name {name!r} has none of the forms {SET_NAME_FORMS}")


def parse_set_name(name: str) -> tuple[str, dict[str, str]]:
    """-> (method, {field: text}) of a set name; DuodiffError for a name of no known form."""
    form, fields = parse_set_form(name)
    return FORM_METHOD[form], fields


def method_of_set(name: str) -> str:
    """The method a sample-set name belongs to, from its form (see SET_NAME_PATTERNS)."""
    return parse_set_name(name)[0]


def stats_method(name: str) -> str:
    """The method stats.json records for a set of this name (`duodiff sample --method`)."""
    form = parse_set_form(name)[0]
    return STATS_METHOD.get(form, form)


# ---- the label of a set's setting --------------------------------------------------------------
# Per style: {method: (column, label with {} for the value(s), value format)} and the label of a
# set without a swept setting. "stats": stats.json's and the csv tables' `setting` column;
# "table": the summary tables' Setting column; "plot": point annotations, legends and panel titles
# of the figures, where sets drawn at one point share one label.
SETTING_STYLES = {
    "stats": ({"early_exit": ("threshold", "threshold={}", ""), "duodiff": ("t_switch", "t_switch={}", ""),
               "cache": ("cache_interval", "N={}", ""), "l2c": ("router_threshold", "router_threshold={}", ""),
               "real": (None, "real images not in the reference", ""),
               "composed": (("t_switch", "t_switch={}", ""), ("threshold", "threshold={}", ""),
                            ("cache_interval", "N={}", ""), ("steps", "steps={}", ""))}, "-"),
    "table": ({"early_exit": ("threshold", "threshold = {}", "g"), "duodiff": ("t_switch", "t_switch = {}", "g"),
               "cache": ("cache_interval", "N = {}", "g"), "l2c": ("router_threshold", "τ = {}", "g"),
               "fewer_steps": ("steps", "{} steps", ""), "real": ("n_samples", "{} images", ""),
               "composed": (("t_switch", "t_switch = {}", "g"), ("threshold", "τ = {}", "g"),
                            ("cache_interval", "N = {}", "g"), ("steps", "{} steps", ""))}, "–"),
    "plot": ({"early_exit": ("threshold", "τ={}", "g"), "duodiff": ("t_switch", "tₛ={}", ""),
              "cache": ("cache_interval", "N={}", "g"), "l2c": ("router_threshold", "τ={}", "g"),
              "fewer_steps": ("steps", "{} steps", ""),
              "composed": (("t_switch", "tₛ={}", ""), ("threshold", "τ={}", "g"), ("cache_interval", "N={}", "g"),
                           ("steps", "{} steps", ""))}, ""),
}  # fmt: skip


def composed_fields(row) -> set:
    """The settings a composed set combines: those its name carries (row["set"]) or, without a
    name, every one the row has (t_switch, threshold not None; steps always)."""
    name = row.get("set") if hasattr(row, "get") else None
    if isinstance(name, str):
        return set(parse_set_form(name)[1]) - {"depth", "classifier_type", "cache_keep"}
    return {"steps"} | {key for key in ("t_switch", "threshold", "cache_interval")
                        if row.get(key) is not None and row.get(key) == row.get(key)}


def setting_label(*rows, style: str = "table") -> str:
    """How the setting of a set (a row of the tables, or a mapping with its method and settings)
    reads in `style` (SETTING_STYLES). Several rows of one method share one label, their values
    joined by ', ' (sets drawn at the same point of a plot). A composed set lists what it combines,
    in SETTING_STYLES' order ("t_switch = 20, τ = 0.15"); several share one label joined by '; '."""
    forms, none = SETTING_STYLES[style]
    form = forms.get(rows[0]["method"])
    if form is None:
        return none
    if isinstance(form[0], tuple):  # composed
        return "; ".join(
            ", ".join(text.format(format(row[column], value_format)) for column, text, value_format in form
                      if column in composed_fields(row))
            for row in rows
        )  # fmt: skip
    column, text, value_format = form
    if column is None:
        return text
    return text.format(", ".join(format(row[column], value_format) for row in rows))


# ---- composed families --------------------------------------------------------------------------
# A family of composed sets sweeps one knob (COMPOSED_KNOBS) with every other ingredient fixed:
# one `composed` entry of the config (workflow/rules/common.smk, composed_families, builds the same
# labels from the config; tests/test_vocabulary.py keeps the two equal).
COMPOSED_KNOBS = ("t_switch", "threshold", "cache_interval", "steps")


def composed_family_label(fields: dict, knob: str | None) -> str:
    """How a family of composed sets reads: its fixed ingredients, the swept `knob` left out (None,
    a family of one value: every ingredient named).
    {"classifier_type": "attention_probe", "steps": 30}, "threshold" -> 'attention_probe at 30 steps';
    {"depth": 3, "t_switch": 20, "classifier_type": "attention_probe"}, "threshold"
    -> 'DuoDiff d3, t_switch 20 + attention_probe';
    {"depth": 3, "t_switch": 20, "cache_interval": 2, "cache_keep": 2}, "cache_interval"
    -> 'DuoDiff d3, t_switch 20 + caching k = 2'."""
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
