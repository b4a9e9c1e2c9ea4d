"""AlpacaEval 2: our model's answers vs GPT-4 Turbo's, judged pairwise, win rate and LC win rate.

Generation is ours (batched chat generation); annotation and metrics are the ``alpaca_eval``
package's, with one hook: an annotator whose ``fn_completions`` may name any importable
function (``module:function``), so the shipped config ``configs/alpaca_eval/local_judge``
plugs in :func:`judge_label_completions` without patching the package's decoder registry.

Length control offline: alpaca_eval's ``length_controlled_v1`` GLM needs two tables that only
live on the Hugging Face hub (per-instruction difficulty and gamed-baseline annotations).
Offline we fit its ``length_controlled_minimal`` formula (length + model terms) with the
package's own design-matrix and fitting helpers and name the GLM in every result row.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import math
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any, Sequence

import yaml

from pipeline.errors import PipelineError
from pipeline.eval.generation import GenerationConfig, generate_chat, load_chat_model
from pipeline.eval.inputs import read_jsonl, subset
from pipeline.eval.judge import load_judge, rank_agreement

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "alpaca_eval"
REFERENCE = "alpaca_eval/model_outputs/gpt4_1106_preview.jsonl"
REFERENCE_NAME = "gpt4_1106_preview"
LABELS = ("m", "M")
OFFLINE_GLM = "length_controlled_minimal"


def _alpaca_eval():
    """Import alpaca_eval; it still imports ``pkg_resources``, which setuptools >= 81 no longer ships."""
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        from packaging.version import parse

        shim = types.ModuleType("pkg_resources")
        shim.parse_version = parse
        shim.get_distribution = lambda name: types.SimpleNamespace(version=importlib.metadata.version(name))
        sys.modules["pkg_resources"] = shim
    import alpaca_eval

    return alpaca_eval


def reference_outputs(mirror: Path, limit: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """GPT-4 Turbo's outputs on the 805 instructions: the instructions we answer and the baseline."""
    rows = read_jsonl(Path(mirror) / REFERENCE)
    return subset(rows, limit, seed)


def generate_outputs(
    model_path: str | Path, instructions: Sequence[dict[str, Any]], gen: GenerationConfig, name: str, dtype: str = "auto"
) -> list[dict[str, Any]]:
    model, tokenizer = load_chat_model(model_path, dtype)
    conversations = [[{"role": "user", "content": row["instruction"]}] for row in instructions]
    answers = generate_chat(model, tokenizer, conversations, gen, desc=f"alpaca_eval {name}")
    return [
        {"instruction": row["instruction"], "output": answer, "generator": name, "dataset": row.get("dataset")}
        for row, answer in zip(instructions, answers)
    ]


def judge_label_completions(prompts: Sequence[str], judge: dict[str, Any], **_: Any) -> dict[str, list]:
    """An alpaca_eval ``fn_completions``: the judge's log-probabilities of "m"/"M" per prompt.

    Returns them in the OpenAI ``logprobs`` shape that alpaca_eval's ``logprob_parser`` reads.
    """
    alpaca_eval = _alpaca_eval()
    start = time.perf_counter()
    conversations = [alpaca_eval.utils.prompt_to_chatml(p) for p in prompts]
    scores = load_judge(judge).label_logprobs(conversations, LABELS, desc="alpaca_eval judge")
    per_prompt = (time.perf_counter() - start) / max(len(prompts), 1)
    completions = []
    for score in scores:
        top = [{"token": label, "logprob": lp} for label, lp in sorted(score.items(), key=lambda kv: -kv[1])]
        completions.append({"text": top[0]["token"] if top else "", "logprobs": {"content": [{"top_logprobs": top}]}})
    return {
        "completions": completions,
        "price_per_example": [0.0] * len(prompts),
        "time_per_example": [per_prompt] * len(prompts),
    }


def _resolve_callable(spec: Any) -> Any:
    if isinstance(spec, str) and ":" in spec:
        module, _, attr = spec.partition(":")
        return getattr(importlib.import_module(module), attr)
    return spec


def annotator_class():
    """alpaca_eval's PairwiseAnnotator, with ``fn_completions: module:function`` allowed in configs."""
    _alpaca_eval()
    from alpaca_eval.annotators.pairwise_evaluator import PairwiseAnnotator, SinglePairwiseAnnotator

    class SingleImportableAnnotator(SinglePairwiseAnnotator):
        def __init__(self, *args, fn_completions="openai_completions", **kwargs):
            super().__init__(*args, fn_completions=_resolve_callable(fn_completions), **kwargs)

    class ImportableAnnotator(PairwiseAnnotator):
        @property
        def SingleAnnotator(self):
            return SingleImportableAnnotator

    return ImportableAnnotator


def write_annotator_config(
    out_dir: Path, judge: dict[str, Any], mirror: Path, config_dir: Path = CONFIG_DIR / "local_judge"
) -> Path:
    """The shipped annotator config with the mirror path and the judge filled in."""
    text = (config_dir / "configs.yaml").read_text().replace("${data_mirror}", str(Path(mirror).resolve()))
    configs = yaml.safe_load(text)
    for name, body in configs.items():
        body.setdefault("completions_kwargs", {})["judge"] = judge
        prompt = Path(body["prompt_template"])
        if not prompt.is_file():
            raise PipelineError(
                f"judge prompt {prompt} not found", where=str(config_dir / "configs.yaml"), fix="check data_mirror"
            )
    dst = Path(out_dir) / config_dir.name / "configs.yaml"
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(yaml.safe_dump(configs, sort_keys=False))
    return dst


def offline_length_controlled_winrate(annotations: Any) -> dict[str, Any]:
    """Win rate plus a length-controlled win rate that needs no hub download (see module doc)."""
    import pandas as pd

    _alpaca_eval()
    from alpaca_eval.metrics import get_winrate
    from alpaca_eval.metrics.glm_winrate import GLM_INFO, fit_LogisticRegressionCV, make_dmatrix_for_model

    metrics = dict(get_winrate(annotations))
    df = pd.DataFrame(annotations)
    delta = df["output_1"].str.len() - df["output_2"].str.len()
    spread = delta.std()
    features = pd.DataFrame(
        {
            # alpaca_eval's encoding: 1 = baseline wins, 2 = model wins, 1.5 (or legacy 0) = draw
            "preference": df["preference"].astype(float).replace({0.0: 1.5}) - 1,
            "std_delta_len": delta / spread if spread and not math.isnan(spread) else 0.0,
            "not_gamed_baseline": True,
        }
    )
    features = features[features["preference"].notna()].reset_index(drop=True)
    metrics["lc_glm"] = OFFLINE_GLM
    if features.empty:
        metrics.update(length_controlled_winrate=math.nan, lc_standard_error=math.nan)
        return metrics
    counterfactual = features[["not_gamed_baseline"]].assign(std_delta_len=0.0)
    train, test = make_dmatrix_for_model(features, counterfactual, formula=GLM_INFO[OFFLINE_GLM]["formula"])
    n_splits = min(5, len(train)) if len(train) >= 2 else 0
    model = fit_LogisticRegressionCV(train, "preference", is_ytrue_proba=True, n_splits=n_splits)
    predicted = pd.Series(model.predict_proba(test)[:, 1])
    metrics["length_controlled_winrate"] = float(predicted.mean() * 100)
    metrics["lc_standard_error"] = float(predicted.sem() * 100) if len(predicted) > 1 else math.nan
    return metrics


def annotate(
    model_outputs: list[dict[str, Any]],
    reference: list[dict[str, Any]],
    judge: dict[str, Any],
    mirror: Path,
    offline: bool = True,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One leaderboard row (win rate, LC win rate, n_total...) and the per-instruction annotations."""
    import pandas as pd

    alpaca_eval = _alpaca_eval()
    if not model_outputs:
        raise PipelineError("no model outputs to annotate", where="alpaca_eval.limit", fix="use a limit >= 1")
    name = model_outputs[0]["generator"]
    wanted = {row["instruction"] for row in model_outputs}
    reference = [row for row in reference if row["instruction"] in wanted]
    fn_metric = offline_length_controlled_winrate if offline else "get_length_controlled_winrate"
    metric_kwargs = None if offline else {"save_weights_dir": None}
    with tempfile.TemporaryDirectory(prefix="alpaca_judge_") as tmp:
        config = write_annotator_config(Path(tmp), judge, mirror)
        leaderboard, annotations = alpaca_eval.evaluate(
            model_outputs=pd.DataFrame(model_outputs),
            reference_outputs=pd.DataFrame(reference),
            annotators_config=str(config),
            name=name,
            output_path=None,
            precomputed_leaderboard=None,
            is_return_instead_of_print=True,
            fn_metric=fn_metric,
            metric_kwargs=metric_kwargs,
            sort_by="length_controlled_winrate",
            is_cache_leaderboard=False,
            Annotator=annotator_class(),
            caching_path=None,
        )
    row = {k: _plain(v) for k, v in leaderboard.loc[name].to_dict().items()}
    row["n_empty_outputs"] = sum(1 for r in model_outputs if not r["output"].strip())
    row["n_judge_failures"] = sum(1 for a in annotations if _missing(a.get("preference")))
    row["judge"] = judge.get("path") if judge.get("kind", "local") == "local" else judge.get("model")
    return row, [{k: _plain(v) for k, v in a.items()} for a in annotations]


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _plain(value: Any) -> Any:
    """numpy scalars -> Python, NaN -> None, so rows serialize as strict JSON."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def published_scores(mirror: Path) -> dict[str, dict[str, float]]:
    """AlpacaEval 2 (GPT-4 Turbo judge) scores of every model in the mirror's leaderboard CSVs."""
    import pandas as pd

    mirror = Path(mirror)
    csvs = [mirror / "alpaca_eval/leaderboards/AlpacaEval_2_weighted_alpaca_eval_gpt4_turbo_leaderboard.csv"]
    csvs += sorted((mirror / "alpaca_eval/paper_mambainllama/leaderboards").glob("*.csv"))
    scores: dict[str, dict[str, float]] = {}
    for csv in csvs:
        if csv.is_file():
            frame = pd.read_csv(csv, index_col=0)
            for name, row in frame.iterrows():
                scores.setdefault(str(name), {"win_rate": row["win_rate"], "length_controlled_winrate": row["length_controlled_winrate"]})
    return scores


def shipped_outputs(mirror: Path) -> dict[str, Path]:
    """Model-output files in the mirror, by generator name (the reference itself excluded)."""
    mirror = Path(mirror)
    files = sorted((mirror / "alpaca_eval/model_outputs").glob("*.jsonl"))
    files += sorted((mirror / "alpaca_eval/paper_mambainllama/model_outputs").glob("*.jsonl"))
    return {f.stem: f for f in files if f.stem != REFERENCE_NAME}


def judge_check(
    mirror: Path, judge: dict[str, Any], limit: int | None, models: Sequence[str] | None = None, seed: int = 0
) -> dict[str, Any]:
    """Score the shipped outputs of models with public AlpacaEval 2 results; rank-correlate."""
    published = published_scores(mirror)
    files = shipped_outputs(mirror)
    names = list(models) if models else [n for n in files if n in published]
    missing = [n for n in names if n not in files or n not in published]
    if missing:
        raise PipelineError(
            f"no shipped outputs or published score for {missing}",
            where="judge_check.alpaca_eval.models",
            fix=f"choose from {sorted(set(files) & set(published))}",
        )
    reference = reference_outputs(mirror)
    rows = {}
    for name in names:
        outputs = subset(read_jsonl(files[name]), limit, seed)
        for row in outputs:
            row["generator"] = name
        rows[name], _ = annotate(outputs, reference, judge, mirror, offline=True)
    result = {"n_instructions": limit, "models": rows}
    for metric in ("length_controlled_winrate", "win_rate"):
        ours = {n: r[metric] for n, r in rows.items() if r.get(metric) is not None}
        result[metric] = rank_agreement(ours, {n: published[n][metric] for n in names})
    return result
