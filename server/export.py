"""The final adapter, exported in PEFT format so that peft loads it with nothing else."""

from __future__ import annotations

from logging import INFO
from pathlib import Path

import numpy as np

from fedlora.config import RunConfig
from fedlora.lora.lowrank import merge_product, truncated_svd
from fedlora.lora.state import AdapterState, LoraFactors
from fedlora.model.models import load_tokenizer, lora_spec
from fedlora.run.checkpoint import save_checkpoint
from fedlora.server.evaluation import ServerEvaluator
from fedlora.strategies.api import LoraStrategy, logger


def export_adapter(
    out: Path,
    cfg: RunConfig,
    evaluator: ServerEvaluator,
    state: AdapterState,
    strategy: LoraStrategy,
) -> dict[str, str]:
    """Save the final adapter in PEFT format (loadable on the original base model).

    A strategy with personal factors (FedSA-LoRA) exports what the server holds, the
    shared factors with the personal ones at zero, and says so in the returned line.
    When the strategy merged deltas into the base (FLoRA), the total delta per module is
    compressed to one rank-``lora-rank`` adapter by truncated SVD (its error and accuracy
    are reported) and the fully merged model is saved too.
    """
    final = out / "adapter"
    meta = {
        "round": cfg.num_server_rounds,
        "strategy": cfg.strategy,
        "run_config": cfg.to_mapping(),
    }
    base = strategy.base_delta()
    if base is None:
        save_checkpoint(final, evaluator.model_for(state), state, meta)
        if strategy.personal_factors:  # FedSA-LoRA: the server holds A; each node its own B
            return {
                "adapter": f"{final} (shared factors only: the global lora_A with lora_B = 0, "
                "which alone leaves the base unchanged; a node's personal adapter is this "
                "one with its lora_B from its store, local-b.safetensors in its state-dir)"
            }
        return {"adapter": str(final)}
    total = {
        m: merge_product(base.get(m), state.scaling, f.b, f.a) for m, f in state.factors.items()
    }
    factors, num, den = {}, 0.0, 0.0
    for m, delta in total.items():
        b, a, err = truncated_svd(delta, cfg.lora_rank)
        factors[m] = LoraFactors(a=a, b=b)
        sq = float(np.sum(np.asarray(delta, np.float64) ** 2))
        num, den = num + err**2 * sq, den + sq
    spec = lora_spec(cfg)
    svd_state = AdapterState(
        {m: LoraFactors(f.a, (f.b / spec.scaling).astype(np.float32)) for m, f in factors.items()},
        state.dense,
        spec.scaling,
    )
    svd_error = float(np.sqrt(num / den)) if den > 0 else 0.0
    save_checkpoint(
        final, evaluator.model_for(svd_state), svd_state, meta | {"svd_truncation_error": svd_error}
    )
    svd_eval = evaluator(svd_state)
    merged = evaluator.model_for(state, base).merge_and_unload()
    merged.save_pretrained(out / "merged-model")
    load_tokenizer(cfg.model, cfg.task).save_pretrained(out / "merged-model")
    # merge_and_unload changed the cached model in place: drop it
    evaluator.forget(state.rank)
    logger.log(
        INFO,
        "Exported rank-%d SVD adapter: truncation error %.3e, accuracy %.4f",
        cfg.lora_rank,
        svd_error,
        svd_eval.accuracy,
    )
    return {
        "adapter": f"{final} (rank-{cfg.lora_rank} SVD of the merged delta, truncation error "
        f"{svd_error:.3e}, accuracy {svd_eval.accuracy:.4f})",
        "merged model": str(out / "merged-model"),
    }
