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
METHODS = ("full", "shallow", "early_exit", "duodiff")
# The methods of the tables' rows, in the papers' order: the sampling methods, the held-out real
# images, and the full model sampled with fewer steps.
METHOD_ORDER = ("real", "full", "fewer_steps", "shallow", "early_exit", "duodiff")
# The method a set's stats.json records when it differs from the set's own method.
STATS_METHOD = {"fewer_steps": "full"}
# The setting each swept method varies from set to set.
SWEPT_SETTING = {"early_exit": "threshold", "duodiff": "t_switch"}

# ddpm: every timestep; ddim and dpm_solver (DPM-Solver++ 2M, U-ViT's ImageNet sampler): `steps` of them.
SAMPLERS = ("ddpm", "ddim", "dpm_solver")
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
# Also the folder names (docs/architecture.md, "Tables and plots"). One pattern per method, each
# name parses one way only; the groups are the fields set_name() takes.
THRESHOLD_PATTERN = r"\d+(?:\.\d+)?(?:e-\d+)?"
SET_NAME_PATTERNS = {
    "real": re.compile(r"real"),
    "full": re.compile(r"full"),
    "fewer_steps": re.compile(r"full_steps(?P<steps>\d+)"),
    "shallow": re.compile(r"shallow_d(?P<depth>\d+)"),
    "early_exit": re.compile(
        rf"ee_(?P<classifier_type>{'|'.join(CLASSIFIER_TYPES)})_thr(?P<threshold>{THRESHOLD_PATTERN})"
    ),
    "duodiff": re.compile(r"duodiff_d(?P<depth>\d+)_ts(?P<t_switch>\d+)"),
}
SET_NAME_FORMS = ("real, full, full_steps<steps>, shallow_d<depth>, ee_<classifier_type>_thr<threshold>, "
                  "duodiff_d<depth>_ts<t_switch>")
SET_NAME_TEMPLATES = {
    "real": "real",
    "full": "full",
    "fewer_steps": "full_steps{steps}",
    "shallow": "shallow_d{depth}",
    "early_exit": "ee_{classifier_type}_thr{threshold}",
    "duodiff": "duodiff_d{depth}_ts{t_switch}",
}


def threshold_label(value) -> str:
    """The threshold as it appears in set names: Python's shortest round-trip float text
    (0.1 -> '0.1', 0.05 -> '0.05', 1 -> '1.0'), so two different thresholds never share a name."""
    return repr(float(value))


def set_name(method: str, **fields) -> str:
    """The name of a set: set_name("duodiff", depth=3, t_switch=10) -> 'duodiff_d3_ts10'."""
    if "threshold" in fields:
        fields = {**fields, "threshold": threshold_label(fields["threshold"])}
    return SET_NAME_TEMPLATES[method].format(**fields)


def parse_set_name(name: str) -> tuple[str, dict[str, str]]:
    """-> (method, {field: text}) of a set name; DuodiffError for a name of no known form."""
    for method, pattern in SET_NAME_PATTERNS.items():
        match = pattern.fullmatch(name)
        if match:
            return method, match.groupdict()
    raise DuodiffError(f"sample set name {name!r} has none of the forms {SET_NAME_FORMS}")


def method_of_set(name: str) -> str:
    """The method a sample-set name belongs to, from its form (see SET_NAME_PATTERNS)."""
    return parse_set_name(name)[0]


# ---- the label of a set's setting --------------------------------------------------------------
# Per style: {method: (column, label with {} for the value(s), value format)} and the label of a
# set without a swept setting. "stats": stats.json's and the csv tables' `setting` column;
# "table": the summary tables' Setting column; "plot": point annotations, legends and panel titles
# of the figures, where sets drawn at one point share one label.
SETTING_STYLES = {
    "stats": ({"early_exit": ("threshold", "threshold={}", ""), "duodiff": ("t_switch", "t_switch={}", ""),
               "real": (None, "real images not in the reference", "")}, "-"),
    "table": ({"early_exit": ("threshold", "threshold = {}", "g"), "duodiff": ("t_switch", "t_switch = {}", "g"),
               "fewer_steps": ("steps", "{} steps", ""), "real": ("n_samples", "{} images", "")}, "–"),
    "plot": ({"early_exit": ("threshold", "τ={}", "g"), "duodiff": ("t_switch", "tₛ={}", ""),
              "fewer_steps": ("steps", "{} steps", "")}, ""),
}  # fmt: skip


def setting_label(*rows, style: str = "table") -> str:
    """How the setting of a set (a row of the tables, or a mapping with its method and settings)
    reads in `style` (SETTING_STYLES). Several rows of one method share one label, their values
    joined by ', ' (sets drawn at the same point of a plot)."""
    forms, none = SETTING_STYLES[style]
    form = forms.get(rows[0]["method"])
    if form is None:
        return none
    column, text, value_format = form
    if column is None:
        return text
    return text.format(", ".join(format(row[column], value_format) for row in rows))
