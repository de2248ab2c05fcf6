"""megatron-core's GPTModel on CPU, the reference the Megatron tests check rosetool against.

megatron-core expects CUDA in a few places; on CPU it needs `torch.cuda.current_device` to name the
CPU, the CUDA RNG tracker's `fork` to be a no-op, and an explicit boolean causal mask.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from rosetool.converters.megatron.unpickler import load_rank_file


def patch_for_cpu(setattr: Callable[[Any, str, Any], None] = setattr) -> None:
    """The CUDA calls megatron-core makes on its CPU path; pass a MonkeyPatch's setattr to undo them later."""
    from megatron.core.tensor_parallel import random
    from megatron.core.transformer.moe import moe_utils
    setattr(torch.cuda, "current_device", lambda: torch.device("cpu"))
    if not hasattr(moe_utils, "te_general_gemm"):   # 0.16.1's router references it unguarded without TE
        moe_utils.te_general_gemm = None
    setattr(torch.cuda, "synchronize", lambda *a, **k: None)     # dist_checkpointing.save waits on CUDA
    setattr(random.get_cuda_rng_tracker(), "fork", lambda *a, **k: contextlib.nullcontext())
    from megatron.core.transformer import multi_latent_attention
    if not isinstance(multi_latent_attention.TELinear, type):   # without TE a mock, which MLA's isinstance rejects
        setattr(multi_latent_attention, "TELinear", type("NoTELinear", (), {}))


def free_port() -> int:
    """A loopback port nothing listens on now: engineers and CI runs share this machine's fixed ports."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_parallel(rank: int = 0, world: int = 1, tp: int = 1, port: int | None = None, ep: int = 1) -> None:
    """`port`: the one all ranks of a multi-process run share; a single process takes any free one."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port or free_port())
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from megatron.core import parallel_state
    parallel_state.initialize_model_parallel(tp, 1, expert_model_parallel_size=ep)


@contextlib.contextmanager
def single_process() -> Iterator[None]:
    """One gloo process of world size 1; the CUDA patches are undone on exit."""
    import pytest
    with pytest.MonkeyPatch.context() as mp:
        patch_for_cpu(mp.setattr)
        init_parallel()
        yield
        shutdown()


def shutdown() -> None:
    from megatron.core import parallel_state
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()


def _activation(args: Any):
    if args.swiglu:
        return F.silu
    return (lambda x: F.gelu(x, approximate="tanh")) if args.openai_gelu else F.gelu


def _moe_config(args: Any) -> dict[str, Any]:
    """TransformerConfig's MoE fields from Megatron-LM's args (none for a dense model); experts run
    sequentially (local spec), dispatched by all-gather, with no auxiliary loss."""
    if not getattr(args, "num_experts", None):
        return {}
    return dict(
        num_moe_experts=args.num_experts, moe_router_topk=args.moe_router_topk,
        moe_ffn_hidden_size=getattr(args, "moe_ffn_hidden_size", None) or args.ffn_hidden_size,
        moe_shared_expert_intermediate_size=getattr(args, "moe_shared_expert_intermediate_size", None),
        moe_shared_expert_gate=getattr(args, "moe_shared_expert_gate", False),
        moe_layer_freq=getattr(args, "moe_layer_freq", 1),
        moe_router_pre_softmax=getattr(args, "moe_router_pre_softmax", False),
        moe_router_score_function=getattr(args, "moe_router_score_function", "softmax"),
        moe_router_topk_scaling_factor=getattr(args, "moe_router_topk_scaling_factor", None),
        moe_router_enable_expert_bias=getattr(args, "moe_router_enable_expert_bias", False),
        moe_router_num_groups=getattr(args, "moe_router_num_groups", None),
        moe_router_group_topk=getattr(args, "moe_router_group_topk", None),
        expert_model_parallel_size=getattr(args, "expert_model_parallel_size", 1),
        moe_grouped_gemm=False, moe_token_dispatcher_type="allgather", moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0)


class MLACoreAttention:
    """The local DotProductAttention for MLA: 0.16.1's MLASelfAttention passes `k_channels`/`v_channels`, which
    only TE's attention accepts; the local one reads head sizes from the tensors, and its output width from
    `kv_channels` (v_head_dim for MLA), so the two are dropped."""

    def __new__(cls, *args: Any, k_channels: int | None = None, v_channels: int | None = None, **kwargs: Any):
        from megatron.core.transformer.dot_product_attention import DotProductAttention
        return DotProductAttention(*args, **kwargs)


def _mla_config(args: Any) -> dict[str, Any]:
    """MLATransformerConfig's fields from Megatron-LM's args (none without --multi-latent-attention)."""
    if not getattr(args, "multi_latent_attention", False):
        return {}
    return dict(
        q_lora_rank=args.q_lora_rank, kv_lora_rank=args.kv_lora_rank, qk_head_dim=args.qk_head_dim,
        qk_pos_emb_head_dim=args.qk_pos_emb_head_dim, v_head_dim=args.v_head_dim, rope_type=args.rope_type,
        rotary_scaling_factor=args.rotary_scaling_factor, mscale=args.mscale, mscale_all_dim=args.mscale_all_dim,
        original_max_position_embeddings=args.original_max_position_embeddings, beta_fast=args.beta_fast,
        beta_slow=args.beta_slow, rotary_base=args.rotary_base)


def build_model(args: Any) -> torch.nn.Module:
    """A GPTModel shaped by a checkpoint's `args` (so the test also checks the args rosetool writes)."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig
    torch.manual_seed(1234)
    mla = _mla_config(args)
    cfg = (MLATransformerConfig if mla else TransformerConfig)(
        num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups, kv_channels=args.v_head_dim if mla else args.kv_channels,
        ffn_hidden_size=args.ffn_hidden_size,
        tensor_model_parallel_size=args.tensor_model_parallel_size, use_cpu_initialization=True,
        normalization=args.normalization, gated_linear_unit=args.swiglu, activation_func=_activation(args),
        add_bias_linear=args.add_bias_linear, add_qkv_bias=args.add_qkv_bias, layernorm_epsilon=args.layernorm_epsilon,
        qk_layernorm=args.qk_layernorm, hidden_dropout=0.0, attention_dropout=0.0, params_dtype=torch.float32,
        rotary_interleaved=getattr(args, "rotary_interleaved", False), **_moe_config(args), **mla)
    if cfg.num_moe_experts or mla:    # a block spec, since MoE and dense layers may alternate
        spec = get_gpt_decoder_block_spec(cfg, use_transformer_engine=False, normalization=args.normalization)
        for layer in spec.layer_specs if mla else ():
            layer.submodules.self_attention.submodules.core_attention = MLACoreAttention
    else:
        spec = get_gpt_layer_local_spec(normalization=args.normalization, qk_layernorm=args.qk_layernorm)
    model = GPTModel(cfg, spec, vocab_size=args.padded_vocab_size, max_sequence_length=args.max_position_embeddings,
                     position_embedding_type=args.position_embedding_type, rotary_base=args.rotary_base,
                     rotary_percent=getattr(args, "rotary_percent", 1.0),
                     share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
                     parallel_output=False)
    return model.eval()


def save_torch_dist(model: torch.nn.Module, args: Any, folder: Path, iteration: int) -> None:
    """Save as Megatron-LM does with --ckpt-format torch_dist: mcore's dist_checkpointing, args in common.pt."""
    from megatron.core import dist_checkpointing
    target = folder / f"iter_{iteration:07d}"
    target.mkdir(parents=True, exist_ok=True)     # every rank of a collective save gets here
    state = {"args": args, "checkpoint_version": 3.0, "iteration": iteration, "model": model.sharded_state_dict()}
    dist_checkpointing.save(state, str(target))
    (folder / "latest_checkpointed_iteration.txt").write_text(str(iteration))


def load_torch_dist(folder: Path) -> torch.nn.Module:
    """Build from common.pt's args and load through megatron-core's own dist_checkpointing.load."""
    from megatron.core import dist_checkpointing
    model = build_model(load_rank_file(folder / "common.pt")["args"])
    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(folder))   # as Megatron-LM does
    assert state["args"].ckpt_format == "torch_dist"    # common.pt's part comes back beside "model"
    model.load_state_dict(state["model"], strict=True)
    return model


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    n = ids.shape[1]
    positions = torch.arange(n).expand_as(ids)
    mask = torch.triu(torch.ones(1, 1, n, n, dtype=torch.bool), 1)
    with torch.no_grad():
        return model(ids, positions, mask, runtime_gather_output=True)


def load_rank(path: Path) -> tuple[Any, dict[str, Any]]:
    blob = load_rank_file(path)
    return blob["args"], blob["model"]


def logits_from_rank_file(path: Path, ids: torch.Tensor) -> torch.Tensor:
    """Build from the file's args, load its weights strictly, run a forward."""
    args, state = load_rank(path)
    model = build_model(args)
    model.load_state_dict(state, strict=True)
    return logits(model, ids)


def tp_worker(rank: int, world: int, folder: str, ids: torch.Tensor, out: str, port: int) -> None:
    """One rank of a TP=world run over gloo; rank 0 saves the gathered logits."""
    patch_for_cpu()
    init_parallel(rank, world, world, port)
    result = logits_from_rank_file(Path(folder) / f"mp_rank_{rank:02d}" / "model_optim_rng.pt", ids)
    if rank == 0:
        torch.save(result, out)
    shutdown()


def randomise(model: torch.nn.Module, expert_seed: int = 0) -> None:
    """Norms around 1, everything else around 0, all drawn at random (megatron-core's init leaves norms at 1
    and biases at 0, which would hide a misplaced one). Each EP rank passes its own `expert_seed`, so every
    global expert differs and a converter that copied one rank's experts to the others would show."""
    shared, experts = torch.Generator().manual_seed(0), torch.Generator().manual_seed(100 + expert_seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=experts if ".local_experts." in name else shared)
            p.copy_(1 + 0.2 * noise if "layernorm" in name else 0.2 * noise)


def save_torch(model: torch.nn.Module, args: Any, folder: Path, iteration: int, rank_dir: str = "mp_rank_00") -> None:
    """Save one rank as Megatron-LM does with --ckpt-format torch."""
    rank = folder / f"iter_{iteration:07d}" / rank_dir / "model_optim_rng.pt"
    rank.parent.mkdir(parents=True)
    (folder / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    torch.save({"args": args, "checkpoint_version": 3.0, "iteration": iteration, "model": model.state_dict()}, rank)


def ep_worker(rank: int, world: int, folder: str, ids: torch.Tensor, out: str, port: int, args: Any = None,
              dist: bool = False) -> None:
    """One rank of an EP=world run over gloo (Megatron-LM's rank folder mp_rank_00_{ep:03d}); rank 0 saves
    the logits. With `args`, megatron-core builds, randomises and saves its own checkpoint under `folder`;
    without, the rank loads rosetool's checkpoint from `folder` strictly. `dist`: torch_dist, saved and
    loaded collectively by megatron-core's dist_checkpointing, instead of one torch file per rank."""
    patch_for_cpu()
    init_parallel(rank, world, port=port, ep=world)
    rank_dir = f"mp_rank_00_{rank:03d}"
    if args is None and dist:
        model = load_torch_dist(Path(folder))
    elif args is None:
        file_args, state = load_rank(Path(folder) / rank_dir / "model_optim_rng.pt")
        model = build_model(file_args)
        model.load_state_dict(state, strict=True)
    else:
        model = build_model(args)
        randomise(model, expert_seed=rank)
        if dist:
            save_torch_dist(model, args, Path(folder), 1)
        else:
            save_torch(model, args, Path(folder), 1, rank_dir)
    result = logits(model, ids)
    if rank == 0:
        torch.save(result, out)
    shutdown()


def tiny_hf(kind: str, folder: Path, tie: bool = False) -> torch.nn.Module:
    """A random tiny HF model saved to `folder`; vocab 100 so Megatron pads it (to 128 * TP)."""
    import transformers as tf
    torch.manual_seed(0)
    if kind == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=64,
                                                 bos_token_id=0, eos_token_id=1))
    else:
        config, cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
                       "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM)}[kind]
        model = cls(config(vocab_size=100, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                           bos_token_id=0, eos_token_id=1, tie_word_embeddings=tie))
        if kind == "qwen2":    # random biases, so a bias put in the wrong place shows in the logits
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    torch.nn.init.normal_(proj.bias)
    model.save_pretrained(folder)
    return model.eval()


def hf_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits
