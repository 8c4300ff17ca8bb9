"""The notes under the summary table: conventions (what each column means, how it was measured)
and caveats (sets sampled or timed differently, missing CMMD, small-sample FID), in plain text;
the LaTeX writer escapes them, the HTML writer quotes them."""

from __future__ import annotations

import pandas as pd

from duodiff.report.tables.cells import cmmd_computed, decimals


def sentence(text) -> str:
    """Notes from other files, ended with exactly one full stop."""
    text = str(text).strip()
    return text if text.endswith((".", "!", "?")) else text + "."


def notes(frame: pd.DataFrame, footnotes: dict[str, int]) -> list[str]:
    """Conventions and caveats printed under the table (plain text; the LaTeX writer escapes it)."""
    full = frame.loc[frame["set"] == "full"].iloc[0]
    timing = frame.attrs.get("timing")  # timing.json of duodiff time, or None
    real = frame[frame["method"] == "real"]
    cmmd = cmmd_computed(frame)
    frame = frame[frame["method"] != "real"]  # the notes on sampling and cost are about generated sets
    lines = [_headline_note(full)]
    if len(real):
        row = real.iloc[0]
        lines.append(_real_note(row))
    lines.append(_marks_note(frame, full))
    lines.append(_sampling_note(frame, full))
    lines.append(_samples_note(frame, full, cmmd))
    lines.extend(_network_notes(frame))
    lines.extend(_cost_notes(frame, full, timing))
    lines.extend(_cmmd_notes(frame, footnotes, cmmd))
    lines.append(_bold_note(full))
    return lines


def _real_note(row) -> str:
    """What the floor is: how its images were drawn (stats.json's selection), and whether the models
    saw them, which decides what a method's score at the floor means."""
    drawn = f" ({row['real_selection']})" if isinstance(row.get("real_selection"), str) else ""
    seen = {True: " The models and the feature network were trained on every training image, these included: "
                  "the floor is what real images the models were fitted to score, not unseen ones.",
            False: " No model was trained on them."}.get(row.get("real_seen"), "")
    caveats = f" ({' '.join(sentence(n) for n in row['real_notes'])})" if row["real_notes"] else ""
    below = ""
    if pd.notna(row.get("kid_headline_ci_high")) and row["kid_headline_ci_high"] < 0:
        # Measured on the default study: KD -5.3 [-10.3, -0.4] x 1e-3 for the floor of split seed 0 (FD
        # 0.13 [0.04, 0.22]). In a simulation of 10 clusters, a stratified split's KD averaged -0.85
        # (+- 0.007) where a plain random split's averaged -0.01 (+- 0.07): stratifying is the cause.
        below = (" Its KD interval lies below 0: the split gives both sets exactly the dataset's class mix, so they "
                 "are more alike than two independent draws, which the unbiased KD assumes; its expected value is "
                 "then below 0. The interval holds the reference fixed, so it also leaves the reference's own "
                 "variation out.")
    return (f"Real data: {row['n_samples']} real images{drawn}, scored against the reference like a sample set: "
            f"the floor, what real images of the same distribution score{caveats}.{seen}{below}")


def _marks_note(frame: pd.DataFrame, full) -> str:
    """The paired test of equal quality, its margin and how many sets pass it."""
    name, verdicts = full["score_name"], frame["verdict"]
    if frame["score_diff_ci_high"].isna().all():
        return ("No paired intervals (metrics.intervals: false, or sets scored without the full model as baseline): "
                "equal quality cannot be tested.")
    return (f"Δ{name} vs full: the set's {name} minus the full model's, with a paired 95% interval (jackknife over "
            f"the shared sample index: every set starts sample i from the same noise and label). Equal quality is "
            f"non-inferiority: the interval's upper end is at most the margin, {full['margin']:.0%} of the full "
            f"model's {name} ({full['quality_limit']:.3g}). † worse: the upper end exceeds the margin (not shown to "
            f"be within it); ‡ better: the upper end is below 0; {int((verdicts == 'equal').sum())} equal, "
            f"{int((verdicts == 'worse').sum())} worse, {int((verdicts == 'better').sum())} better.")


def _sampling_note(frame: pd.DataFrame, full) -> str:
    setups = frame[["sampler", "steps", "seed"]].drop_duplicates()
    if len(setups) == 1:
        return f"Sampling: {full['sampler']} with {full['steps']} steps, seed {full['seed']} for every set."
    if (frame["method"] != "fewer_steps").all() or len(frame[frame["method"] != "fewer_steps"][["sampler", "steps", "seed"]].drop_duplicates()) > 1:
        per_set = "; ".join(f"{r.set}: {r.sampler} {r.steps} steps, seed {r.seed}" for r in frame.itertuples())
        return f"Sampling differs between sets ({per_set})."
    fewer = ", ".join(str(v) for v in frame.loc[frame["method"] == "fewer_steps", "steps"])
    return (f"Sampling: {full['sampler']} with {full['steps']} steps, seed {full['seed']} for every set; "
            f"the fewer-steps sets run the full model with {fewer} steps from the same noise.")


# What each FID protocol is (inception.MODES), said beside the mode's name under the table.
MODE_NOTES = {
    "clean": " (PIL bicubic resize in float; not the papers' protocol, so not comparable with their FIDs)",
    "legacy_pytorch": " (pytorch-fid's network and bilinear resize: the protocol of U-ViT's, DeeDiff's and DuoDiff's FIDs)",
}


def _network_notes(frame: pd.DataFrame) -> list[str]:
    """The feature networks behind FID/KID, and each caveat fid.json carries, with its sets."""
    networks = frame[["feature_network", "feature_network_sha256"]].drop_duplicates()
    described = ", ".join(f"{r.feature_network} (sha256 {str(r.feature_network_sha256)[:12]}…)"
                          for r in networks.itertuples())
    mode = frame["fid_mode"].iloc[0]  # one mode per table (table_inputs.check_one_mode)
    kid = "FID (Inception) and KID" if frame["kid"].notna().any() else "FID (Inception; no KID)"
    lines = [f"{kid}: clean-fid, mode {mode}{MODE_NOTES.get(mode, '')}, features from {described}"
             + (" — feature networks differ between sets, so their FIDs are not comparable." if len(networks) > 1 else ".")]
    fid_notes: dict[str, list[str]] = {}
    for row in frame.itertuples():
        for text in row.fid_notes:
            fid_notes.setdefault(str(text), []).append(row.set)
    for text, sets in fid_notes.items():
        where = "all sets" if len(sets) == len(frame) else ", ".join(sets)
        lines.append(f"FID caveat ({where}): {sentence(text)}")
    return lines


def _cost_notes(frame: pd.DataFrame, full, timing: dict | None) -> list[str]:
    """What GFLOPs/image, the layer ratio and images/s count, and where they were measured."""
    conventions = frame["gflops_convention"].drop_duplicates()
    linear_conv = full["gflops_per_forward_linear_conv"]
    lines = ["GFLOPs/image: the network evaluations of one image over all its sampling steps, mean over "
             "samples (the unit of every table and plot). " + " ".join(sentence(c) for c in conventions)
             + " Counting linear and conv layers only (the DeeDiff and DuoDiff papers' convention, per network "
             f"evaluation) the full model costs {linear_conv:.{decimals('gflops_per_image', [linear_conv])}f} GFLOPs "
             "per forward (gflops.csv: gflops_per_forward_linear_conv).",
             f"Layer ratio: transformer blocks executed per network evaluation, averaged over steps and "
             f"samples, as a fraction of the full model's {full['depth']} (1 = full model)."]
    if timing is not None:  # every set timed alone after sampling (duodiff time)
        lines.append(f"Images/s and speed-up (measured): every set timed alone after sampling (duodiff time) on "
                     f"{timing['device_name']} ({timing['device']}, {timing['threads']} thread(s), clock "
                     f"{timing['clock']}): {timing['rounds']} rounds, each running every set once on one batch of "
                     f"{timing['batch_size']} from fixed noise, interleaved with the full model, after an untimed "
                     f"warm-up. Speed-up (measured) = the median over rounds of the full model's time ÷ the set's, "
                     f"with a {timing['confidence']:.0%} interval ({timing['interval_method']}); speed-up "
                     "(theoretical) = the full model's GFLOPs per image ÷ the set's.")
        return lines
    devices = frame[["device", "torch_version", "batch_size", "precision", "timing_clock"]].drop_duplicates()
    clocks = {"cpu": "timed by the CPU time of the single-threaded sampling process, which other jobs running side "
                     "by side do not slow down", "wall": "timed by the wall clock"}
    measured = ", ".join(f"{r.device} (torch {r.torch_version}, batch size {r.batch_size}, {r.precision}, "
                         f"{clocks[r.timing_clock]})" for r in devices.itertuples())
    lines.append(f"Images/s: measured sampling throughput on {measured}. Speed-up (measured) = images/s ÷ the "
                 f"full model's; speed-up (theoretical) = the full model's GFLOPs per image ÷ the set's."
                 + (" Sets were timed on different set-ups, so measured speed-ups mix them." if len(devices) > 1 else ""))
    return lines


def _bold_note(full) -> str:
    """The rule of best_mask, in words."""
    return ("Bold: the best value of each column. Quality columns: the lowest among the generated sets. Cost "
            "columns (GFLOPs/image, images/s, speed-ups): the best among the full model and the sets of fewer steps, "
            f"early exit and DuoDiff that pass the paired test of equal quality ({full['margin']:.0%} margin), so "
            "that a cheaper set of worse quality is not crowned; the shallow model alone (DuoDiff's first stage, the "
            "cheapest by construction) is never a cost contender.")


def _samples_note(frame: pd.DataFrame, full, cmmd: bool) -> str:
    """How many samples each score used; CMMD's count only where CMMD was computed."""
    columns = ["n_samples", "fid_n_samples", "n_reference"] + (["cmmd_n_samples"] if cmmd else [])
    # How the reference was drawn (reference.json's selection, e.g. a seeded class-stratified sample or
    # the whole training set); absent from fid.json written before it was recorded.
    drawn = f" ({full['reference_selection']})" if isinstance(full.get("reference_selection"), str) else ""
    if len(frame[columns].drop_duplicates()) == 1:
        return (f"Samples: {full['n_samples']} per set; FID and KID from {full['fid_n_samples']} samples "
                f"against {full['n_reference']} real images{drawn}"
                + (f"; CMMD from {full['cmmd_n_samples']} samples." if cmmd else "."))
    per_set = "; ".join(f"{r.set}: {r.n_samples} (FID/KID {r.fid_n_samples} vs {r.n_reference} real"
                        + (f", CMMD {r.cmmd_n_samples})" if cmmd else ")") for r in frame.itertuples())
    return f"Samples per set: {per_set}."


def _cmmd_notes(frame: pd.DataFrame, footnotes: dict[str, int], cmmd: bool) -> list[str]:
    """The footnotes of the sets without CMMD, or, when no set has it, one note instead of a
    column of n/a."""
    if cmmd:
        return [f"[{number}] CMMD n/a: {sentence(reason)}" for reason, number in footnotes.items()]
    reasons = " ".join(sentence(reason) for reason in frame["reason"].dropna().astype(str).drop_duplicates())
    return [f"CMMD: not computed for any set, so the table has no CMMD column. {reasons}".strip()]


def _headline_note(full) -> str:
    name = full["score_name"]
    if name == "FID":
        what = "FID: clean-fid's Fréchet Inception distance"
    else:
        what = (f"{name} / KD: Fréchet distance / KID in the features of a classifier trained on the dataset "
                f"({full['score_network']}; duodiff feature-net), the headline scores")
    return (f"{what}, each with its 95% confidence interval (score ± 1.96 jackknife standard errors over the set's images, the reference "
            f"fixed), from {full['score_n_samples']} images per set against {full['score_n_reference']} reference "
            "images. Lower is better.")
