"""Build the demo's competent base model: a small Llama pretrained in-process on the demo world.

Why this exists: a random base has nothing to forget and learns only what a reward lets it game, so
the demo could not show a night making a model better. This module pretrains a 3.1M-parameter Llama
(hidden 256, 4 layers, 4 heads of 64: vLLM's CPU kernels need head_dim 64) with supervised
next-token training on `pipeline.demo_world.skills`: arithmetic taught partly (with the systematic
forgotten-carry mistake), support answers, JSON and refusals taught well; then a short fine-tuning
phase teaches support answers in the styles real logs have (short, padded, another question's). Digits are tokenized one
by one (`pre_tokenizers.Digits`), as production tokenizers do; with multi-digit BPE tokens a model
this small does not learn to add.

The training loop is written here rather than run through `transformers.Trainer`/TRL's SFT
trainer: it is pretraining from scratch on an endless in-memory stream with the prompt masked out,
and the plain loop (AdamW, one-cycle learning rate, gradient clipping) is about twenty lines, has
no dataset or logging machinery to configure, and keeps the whole build within its budget
(about 10 minutes on 2 cores). The chat template, special tokens and file conventions are the tiny
model's (`pipeline.demo_world.tiny_model`), so every consumer treats both models alike.

The build runs in a child process whose CPU kernels are pinned to AVX2 (`CPU_KERNELS`): PyTorch
picks its vectorised kernels by what the CPU offers, and AVX-512 and AVX2 kernels round the last bit
of a float differently; over 2,400 steps that grew into different bases (measured: 42% arithmetic on
an AVX-512 machine, 46% with the kernels pinned), so the base and the figures quoted for it would
depend on the machine. The kernels can only be chosen before the first tensor operation, hence the
child process; it also leaves the caller's thread settings alone.

The build is cached like the tiny model's: it happens in a staging directory next to the target and
is moved into place only when complete (an interrupted build leaves nothing a later run would use);
a stamp (`overnight-base-model.json`) records the spec, recipe, seed, each skill's measured accuracy
and a sha256 of every file, so a second build is a no-op and a corrupt or foreign directory is
detected and rebuilt (only ever a directory this builder stamped).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from copy import deepcopy
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from evals.suites import Suite
from pipeline.adapters import file_digests
from pipeline.demo_world import skills
from pipeline.demo_world.tiny_model import (
    ASSISTANT,
    BOS,
    END,
    EOS,
    PAD,
    SPECIAL_TOKENS,
    USER,
    generation_config,
    make_readable,
    move_into_place,
    no_progress_bars,
    token_id,
    wrap_tokenizer,
)

__all__ = [
    "BaseModelSpec",
    "Recipe",
    "TeacherRecipe",
    "build_base_model",
    "build_teacher_model",
    "evaluate_skills",
    "main",
]

logger = logging.getLogger(__name__)

STAMP_FILE = "overnight-base-model.json"
STAMP_FORMAT = 1
# The child process's CPU kernels: AVX2, which every x86-64 server of the last decade has, so the same
# recipe gives the same weights on every such machine (see the module docstring).
CPU_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
PROGRESS = "[base-model]"  # marks the child's progress lines on its stdout


@dataclass(frozen=True)
class BaseModelSpec:
    """Architecture of the demo base; part of the build stamp."""

    vocab_size: int = 1024
    hidden_size: int = 256
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    head_dim: int = 64
    num_hidden_layers: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 4096  # the judge's prompts are long; training uses < 100
    rope_theta: float = 10000.0


@dataclass(frozen=True)
class Recipe:
    """How the base is pretrained; part of the build stamp.

    A measured point, not a knob to turn freely. With these figures the base answers 46% of the
    held-out arithmetic suite greedily: every sum without a carry, and of those with one 29 right, 100
    with the carry forgotten (the taught mistake) and 8 wrong otherwise; sampled at temperature 1 it
    is right 45% of the time. Support, JSON and refusals are at 95-100%. The build takes about 10
    minutes on 2 cores. Arithmetic is learned late and suddenly, and what matters for RL is how
    *precise* the base is, not only how often it is right (measured, same data): 800 steps of 64
    examples were right as often (41%) but with 67 of 300 answers wrong in other ways than the
    forgotten carry, and GRPO nights then traded sums without a carry for carries and stopped rising;
    1600 steps of 32 left 35 of 200 such answers and three nights rose 87 -> 105 -> 103 -> 113; these
    2400 steps of 32 leave 8, and three nights of 12 GRPO steps rose 92 -> 116 -> 136 -> 135 right of
    200, with every sum without a carry kept. 3200 steps of 16 examples were worse (23%): more, smaller
    steps do not replace examples. The build is deterministic, so a given recipe always lands on its
    figures.

    Then `finetune_steps` of a second phase (`skills.FINETUNE_MIXTURE`, a one-cycle learning rate
    peaking at `finetune_lr`) teach the support styles the demo's users react to, replaying the other
    skills; pretraining is left as it was, so the arithmetic above holds.
    """

    steps: int = 2400
    batch_size: int = 32  # examples a step, packed into rows of `pack_width` tokens
    pack_width: int = 128
    peak_lr: float = 2e-3
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    carry_drop: float = skills.CARRY_DROP
    threads: int = 2  # fixed, so the float reductions (and the weights) repeat on every machine
    cpu_kernels: str = CPU_KERNELS["ATEN_CPU_CAPABILITY"]  # likewise (see `CPU_KERNELS`)
    # The fine-tuning phase (`skills.FINETUNE_MIXTURE`): the support styles, the rest replayed.
    finetune_steps: int = 200
    finetune_lr: float = 5e-4


# --------------------------------------------------------------------------- tokenizer and model


def _tokenizer(spec: BaseModelSpec) -> PreTrainedTokenizerFast:
    """Byte-level BPE over individually split digits, trained on the world's own text."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(skills.tokenizer_corpus(), trainer=trainer)
    return wrap_tokenizer(tokenizer, spec.max_position_embeddings)


def _model(spec: BaseModelSpec, tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
        tie_word_embeddings=False,
        pad_token_id=token_id(tokenizer, PAD),
        bos_token_id=token_id(tokenizer, BOS),
        eos_token_id=token_id(tokenizer, EOS),
        dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = generation_config(tokenizer)
    return model.float()


# --------------------------------------------------------------------------- pretraining


def _prompt_text(question: str) -> str:
    """The chat template's rendering of one user turn and the generation prompt, as plain text.

    Rendering the Jinja template costs milliseconds per call, which at 64 examples a step would be
    most of the build; `_check_prompt_text` makes sure this stays what the template renders."""
    return f"{BOS}{USER}\n{question}{END}\n{ASSISTANT}\n"


def _check_prompt_text(tokenizer: PreTrainedTokenizerFast) -> None:
    chat = [{"role": "user", "content": "What is 12 + 30?"}]
    rendered = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    if rendered != _prompt_text("What is 12 + 30?"):
        raise RuntimeError(f"the chat template renders {rendered!r}, not what pretraining assumes")


def _encode(
    tokenizer: PreTrainedTokenizerFast, examples: Sequence[skills.Example]
) -> list[tuple[list[int], int]]:
    """(token ids, prompt length) per example: the chat prompt, then the answer and the end-of-turn marker."""
    prompts = tokenizer([_prompt_text(e.question) for e in examples], add_special_tokens=False)["input_ids"]
    answers = tokenizer([e.answer + END for e in examples], add_special_tokens=False)["input_ids"]
    return [(list(p) + list(a), len(p)) for p, a in zip(prompts, answers, strict=True)]  # type: ignore[arg-type]


def _pack(encoded: Sequence[tuple[list[int], int]], pad_id: int, width: int) -> tuple[torch.Tensor, ...]:
    """Pack examples into rows of at most `width` tokens: inputs, position ids, attention mask, labels.

    First-fit by decreasing length. Each example restarts its position ids at 0 and attends only to
    itself: the mask is block-diagonal and causal, 4-D, so transformers uses it as given rather than
    relying on its packed-sequence detection (which is off whenever the model builds a KV cache).
    Packing instead of padding to the longest example in the batch computes about 40% fewer tokens
    (measured at 64 examples a step: about 0.45 s against 0.60 s on 2 cores). Prompts and padding
    are masked out of the labels with -100.
    """
    rows: list[list[tuple[list[int], int]]] = []
    used: list[int] = []
    for ids, prompt_length in sorted(encoded, key=lambda item: -len(item[0])):
        row = next((r for r, n in enumerate(used) if n + len(ids) <= width), None)
        if row is None:
            rows.append([])
            used.append(0)
            row = len(rows) - 1
        rows[row].append((ids, prompt_length))
        used[row] += len(ids)
    longest = max(used)
    inputs = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), longest), -100, dtype=torch.long)
    positions = torch.zeros((len(rows), longest), dtype=torch.long)
    segments = torch.zeros((len(rows), longest), dtype=torch.long)
    for r, items in enumerate(rows):
        start = 0
        for number, (ids, prompt_length) in enumerate(items, start=1):
            end = start + len(ids)
            inputs[r, start:end] = torch.tensor(ids)
            labels[r, start + prompt_length : end] = torch.tensor(ids[prompt_length:])
            positions[r, start:end] = torch.arange(len(ids))
            segments[r, start:end] = number
            start = end
        positions[r, start:] = torch.arange(longest - start)  # the padding is a block of its own
    causal = torch.ones((longest, longest), dtype=torch.bool).tril()
    mask = (segments[:, :, None] == segments[:, None, :]) & causal
    return inputs, positions, mask[:, None], labels


def pretrain(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    recipe: Recipe,
    seed: int,
    *,
    on_step: Callable[[int, float], None] = lambda step, loss: None,
) -> float:
    """Supervised next-token training on the world's stream, then the fine-tuning phase; returns the
    last logged loss. `on_step` counts the steps of both phases in one sequence."""
    _check_prompt_text(tokenizer)
    model.train()
    loss_value = math.nan
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        phases = (
            ("pretrain", recipe.steps, recipe.peak_lr, recipe.pack_width),
            ("finetune", recipe.finetune_steps, recipe.finetune_lr, recipe.pack_width),
        )
        done = 0
        for phase, steps, peak_lr, pack_width in phases:
            if phase == "finetune" and steps == 0:  # pretraining always runs (0 steps is an error)
                continue
            stream = skills.pretraining_examples(seed, carry_drop=recipe.carry_drop, phase=phase)
            loss_value = _train_phase(
                model,
                tokenizer,
                stream,
                recipe,
                steps=steps,
                peak_lr=peak_lr,
                pack_width=pack_width,
                on_step=lambda step, loss, done=done: on_step(done + step, loss),
            )
            done += steps
    model.eval()
    return loss_value


def _train_phase(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    stream: Iterator[skills.Example],
    recipe: Recipe,
    *,
    steps: int,
    peak_lr: float,
    pack_width: int,
    on_step: Callable[[int, float], None],
) -> float:
    """`steps` steps of AdamW with a one-cycle learning rate peaking at `peak_lr`."""
    pad_id = token_id(tokenizer, PAD)
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak_lr, weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peak_lr, total_steps=steps)
    loss_value = math.nan
    for step in range(1, steps + 1):
        # Mixed batches, not length-grouped: grouping by length makes batches of one skill each,
        # and those pull the weights back and forth (measured: arithmetic never learned).
        inputs, positions, mask, labels = _pack(
            _encode(tokenizer, [next(stream) for _ in range(recipe.batch_size)]), pad_id, pack_width
        )
        loss = model(
            input_ids=inputs, position_ids=positions, attention_mask=mask, labels=labels, use_cache=False
        ).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.max_grad_norm)
        optimizer.step()
        schedule.step()
        loss_value = float(loss.detach())
        on_step(step, loss_value)
    return loss_value


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def _replies(
    model: Any,  # a LlamaForCausalLM (pyright cannot bind transformers' `generate` to it)
    tokenizer: PreTrainedTokenizerFast,
    chats: Sequence[list[dict[str, str]]],
    *,
    sample: bool = False,
    max_new_tokens: int = 40,
) -> list[str]:
    replies: list[str] = []
    for start in range(0, len(chats), 64):
        batch = tokenizer.apply_chat_template(
            list(chats[start : start + 64]),
            add_generation_prompt=True,
            return_tensors="pt",
            padding=True,
            return_dict=True,
        )
        out = model.generate(
            **batch,  # type: ignore[arg-type]
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            temperature=1.0 if sample else None,
            top_k=0 if sample else None,
        )
        width = batch["input_ids"].shape[1]  # type: ignore[index]
        replies += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return [reply.strip() for reply in replies]


def _greedy(
    model: Any, tokenizer: PreTrainedTokenizerFast, questions: Sequence[str], *, sample: bool = False
) -> list[str]:
    return _replies(model, tokenizer, [[{"role": "user", "content": q}] for q in questions], sample=sample)


# Skills also measured on sampled replies (temperature 1, 4 per case): arithmetic (how often a GRPO
# sample is right, i.e. whether its groups carry signal) and concise support (how often a user
# would like a sampled reply, i.e. whether their thumbs carry signal).
SAMPLED_SUITES = ("demo-arithmetic", "demo-concise-support")


def evaluate_skills(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, suites: Sequence[Suite] | None = None
) -> dict[str, float]:
    """Greedy accuracy on each demo suite (held-out cases), and the sampled accuracy of
    `SAMPLED_SUITES` (`<suite>@T1`)."""
    scores: dict[str, float] = {}
    for suite in suites or skills.demo_suites():
        questions = [str(case.messages[-1]["content"]) for case in suite.cases]
        replies = _greedy(model, tokenizer, questions)
        scores[suite.name] = sum(case.score(r) for case, r in zip(suite.cases, replies, strict=True)) / len(
            replies
        )
        if suite.name in SAMPLED_SUITES:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                sampled = _greedy(model, tokenizer, questions * 4, sample=True)
            cases = list(suite.cases) * 4
            scores[f"{suite.name}@T1"] = sum(c.score(r) for c, r in zip(cases, sampled, strict=True)) / len(
                cases
            )
    return scores


# --------------------------------------------------------------------------- stamp and build


def _identity(spec: BaseModelSpec, recipe: Recipe, seed: int) -> dict[str, Any]:
    world = {
        "version": skills.WORLD_VERSION,
        "mixture": [list(pair) for pair in skills.MIXTURE],
        "finetune_mixture": [list(pair) for pair in skills.FINETUNE_MIXTURE],
        "support_styles": [list(pair) for pair in skills.SUPPORT_STYLES],
        "heldout_share": skills.HELDOUT_SHARE,
    }
    return {
        "format": STAMP_FORMAT,
        "spec": asdict(spec),
        "recipe": asdict(recipe),
        "world": world,
        "seed": seed,
    }


def _digests(directory: Path) -> dict[str, str]:
    return {name: digest for name, digest in file_digests(directory).items() if name != STAMP_FILE}


def read_stamp(directory: Path) -> dict[str, Any] | None:
    """The build stamp of `directory`, or None when it has none (or an unreadable one)."""
    try:
        stamp = json.loads((directory / STAMP_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) else None


def _reusable(out_dir: Path, identity: dict[str, Any]) -> bool:
    """True when `out_dir` holds this exact, intact build; False when it may be (re)built into.

    A directory without a stamp that is not empty is never touched (FileExistsError); a stamped
    one with another identity, or whose files no longer match the stamp (corrupt), is rebuilt.
    """
    if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
        return False
    stamp = read_stamp(out_dir) if out_dir.is_dir() else None
    if stamp is None:
        raise FileExistsError(
            f"{out_dir} exists and is not a demo base-model build (no {STAMP_FILE}); refusing to touch it"
        )
    if {key: stamp.get(key) for key in identity} != identity:
        logger.warning("%s holds a base model of another spec, recipe or seed: rebuilding it", out_dir)
        return False
    if stamp.get("files") != _digests(out_dir):
        logger.warning("%s: files differ from the build stamp (corrupt or edited): rebuilding it", out_dir)
        return False
    return True


def build_base_model(
    out_dir: str | Path,
    *,
    spec: BaseModelSpec = BaseModelSpec(),
    recipe: Recipe = Recipe(),
    seed: int = 0,
    on_progress: Callable[[str], None] = lambda message: None,
    isolated: bool = True,
) -> Path:
    """Build (or reuse) the competent demo base model in `out_dir`; returns its path.

    `isolated` (the default) builds in a child process with the recipe's CPU kernels, so the weights
    are the same on every machine; False builds in this process, with whatever kernels it already
    uses (tests of the build's mechanics)."""
    out_dir = Path(out_dir).expanduser().resolve()
    identity = _identity(spec, recipe, seed)
    if _reusable(out_dir, identity):
        logger.info("demo base model already built in %s; reusing it", out_dir)
        return out_dir
    if isolated:
        arguments = [
            "--spec",
            json.dumps(asdict(spec)),
            "--recipe",
            json.dumps(asdict(recipe)),
            "--seed",
            str(seed),
        ]
        _build_in_child(out_dir, arguments, recipe, on_progress)
    else:
        _build(out_dir, identity, spec, recipe, seed, on_progress)
    return out_dir


def _build_in_child(
    out_dir: Path, arguments: list[str], recipe: Recipe, on_progress: Callable[[str], None]
) -> None:
    """Run `main` with `arguments` in a child process with `recipe`'s pinned CPU kernels and threads,
    passing its progress lines on."""
    command = [
        sys.executable,
        "-m",
        "pipeline.demo_world.base_model",  # not __name__: that is "__main__" when run with -m
        str(out_dir),
        *arguments,
        "--in-process",
    ]
    kernels = {**CPU_KERNELS, "ATEN_CPU_CAPABILITY": recipe.cpu_kernels}
    env = {**os.environ, **kernels, "OMP_NUM_THREADS": str(recipe.threads)}
    tail: deque[str] = deque(maxlen=20)
    with subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as child:
        try:
            assert child.stdout is not None
            for line in child.stdout:
                tail.append(line.rstrip())
                if line.startswith(PROGRESS):
                    on_progress(line[len(PROGRESS) :].strip())
            returncode = child.wait()
        except BaseException:
            # SIGINT, not SIGTERM: the child unwinds as from Ctrl-C, and its `finally` removes
            # its staging directory on the way out.
            child.send_signal(signal.SIGINT)
            child.wait()
            raise
    if returncode != 0:
        raise RuntimeError(
            f"building the demo model in {out_dir} failed (exit {returncode}): "
            + next((line for line in reversed(tail) if line.strip()), "no output")
        )


def _build(
    out_dir: Path,
    identity: dict[str, Any],
    spec: BaseModelSpec,
    recipe: Recipe,
    seed: int,
    on_progress: Callable[[str], None],
) -> None:
    """Pretrain, evaluate and save into a staging directory, then move it into place."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    try:
        tokenizer = _tokenizer(spec)
        model = _model(spec, tokenizer, seed)
        total = recipe.steps + recipe.finetune_steps
        every = max(1, total // 13)

        def progress(step: int, loss: float) -> None:
            if step % every == 0 or step in (recipe.steps, total):
                phase = "pretraining" if step <= recipe.steps else "fine-tuning"
                on_progress(f"{phase} step {step}/{total}: loss {loss:.3f}")

        pretrain(model, tokenizer, recipe, seed, on_step=progress)
        accuracy = _save_build(model, tokenizer, identity, staging, out_dir, start)
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(staging, ignore_errors=True)
    on_progress("skills (held-out): " + ", ".join(f"{k} {v:.0%}" for k, v in accuracy.items()))
    logger.info("built the demo base model in %s in %.0fs", out_dir, time.perf_counter() - start)


def _save_build(
    model: LlamaForCausalLM,
    tokenizer: Any,
    identity: dict[str, Any],
    staging: Path,
    out_dir: Path,
    start: float,
) -> dict[str, float]:
    """Evaluate the built model, save it with its stamp into `staging`, move that into place; returns
    its skills."""
    accuracy = evaluate_skills(model, tokenizer)
    tokenizer.save_pretrained(staging)
    with no_progress_bars():
        model.save_pretrained(staging)
    stamp = {
        **identity,
        "skills": accuracy,
        "build_seconds": round(time.perf_counter() - start, 1),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "parameters": model.num_parameters(),
        "files": _digests(staging),
    }
    (staging / STAMP_FILE).write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    make_readable(staging)
    move_into_place(staging, out_dir)
    return accuracy


# --------------------------------------------------------------------------- the demo's teacher


@dataclass(frozen=True)
class TeacherRecipe:
    """How the demo's teacher is trained on from the base; part of its stamp.

    The base grown larger, then `steps` more steps of `skills.TEACHER_MIXTURE` with every carry kept
    (`carry_drop` 0: the competence the base was denied), at a one-cycle learning rate peaking at
    `lr`, the other skills replayed as the base knows them. Grown by block expansion (LLaMA Pro, Wu
    et al. 2024): after every `expand_every` of the base's decoder layers a copy of that layer is
    inserted with its output projections (`o_proj`, `down_proj`) zeroed, so the grown model starts as
    exactly the base (each new block adds nothing to the residual stream) and the new blocks learn
    from the first step. The base's tokenizer, so it can teach the base token by token
    (`train.method: distill`): the model a platform would like to serve but cannot afford.
    """

    expand_every: int = 2  # a new decoder layer after every this many of the base's (4 -> 6)
    steps: int = 400
    lr: float = 5e-4
    carry_drop: float = 0.0
    batch_size: int = 32
    pack_width: int = 128


def _teacher_identity(base_dir: Path, recipe: TeacherRecipe, seed: int) -> dict[str, Any]:
    stamp = read_stamp(base_dir)
    if stamp is None:
        raise FileNotFoundError(f"{base_dir} is not a built demo base model (no {STAMP_FILE})")
    return {
        "format": STAMP_FORMAT,
        "teacher": asdict(recipe),
        "mixture": [list(pair) for pair in skills.TEACHER_MIXTURE],
        "base": {key: stamp.get(key) for key in ("spec", "recipe", "world", "seed", "files")},
        "seed": seed,
    }


def build_teacher_model(
    out_dir: str | Path,
    base_dir: str | Path,
    *,
    recipe: TeacherRecipe = TeacherRecipe(),
    seed: int = 0,
    on_progress: Callable[[str], None] = lambda message: None,
    isolated: bool = True,
) -> Path:
    """Build (or reuse) the demo's teacher in `out_dir` from the base in `base_dir`; returns its path.

    Cached and stamped like the base (the stamp names the base it continues, file by file), built in
    a child process with the same pinned CPU kernels unless `isolated` is False."""
    out_dir = Path(out_dir).expanduser().resolve()
    base_dir = Path(base_dir).expanduser().resolve()
    identity = _teacher_identity(base_dir, recipe, seed)
    if _reusable(out_dir, identity):
        logger.info("demo teacher already built in %s; reusing it", out_dir)
        return out_dir
    if isolated:
        _build_in_child(
            out_dir,
            [
                "--teacher-of",
                str(base_dir),
                "--teacher-recipe",
                json.dumps(asdict(recipe)),
                "--seed",
                str(seed),
            ],
            Recipe(),  # the base's kernels and threads
            on_progress,
        )
    else:
        _build_teacher(out_dir, base_dir, identity, recipe, seed, on_progress)
    return out_dir


def expand_blocks(base: LlamaForCausalLM, every: int) -> LlamaForCausalLM:
    """`base` with a copy of every `every`-th decoder layer inserted after it, the copies' output
    projections zeroed: a deeper model that computes exactly what `base` computes (LLaMA Pro)."""
    layers = list(base.model.layers)
    grown: list[Any] = []
    for index, layer in enumerate(layers):
        grown.append(layer)
        if (index + 1) % every == 0:
            copy: Any = deepcopy(layer)
            with torch.no_grad():
                copy.self_attn.o_proj.weight.zero_()
                copy.mlp.down_proj.weight.zero_()
            grown.append(copy)
    for index, layer in enumerate(grown):
        layer.self_attn.layer_idx = index  # the KV cache is addressed by it
    base.model.layers = torch.nn.ModuleList(grown)
    base.config.num_hidden_layers = len(grown)
    if getattr(base.config, "layer_types", None):  # per-layer attention kinds, where a config has them
        base.config.layer_types = [base.config.layer_types[0]] * len(grown)
    return base


def _build_teacher(
    out_dir: Path,
    base_dir: Path,
    identity: dict[str, Any],
    recipe: TeacherRecipe,
    seed: int,
    on_progress: Callable[[str], None],
) -> None:
    """Train on from the base, evaluate and save into a staging directory, then move it into place."""
    from transformers import AutoTokenizer

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    base_recipe = Recipe()
    threads = torch.get_num_threads()
    torch.set_num_threads(base_recipe.threads)
    try:
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        model = expand_blocks(
            LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32), recipe.expand_every
        )
        every = max(1, recipe.steps // 8)

        def progress(step: int, loss: float) -> None:
            if step % every == 0 or step == recipe.steps:
                on_progress(f"teacher step {step}/{recipe.steps}: loss {loss:.3f}")

        model.train()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            _train_phase(
                model,
                tokenizer,
                skills.pretraining_examples(seed, carry_drop=recipe.carry_drop, phase="teacher"),
                replace(base_recipe, batch_size=recipe.batch_size),
                steps=recipe.steps,
                peak_lr=recipe.lr,
                pack_width=recipe.pack_width,
                on_step=progress,
            )
        model.eval()
        accuracy = _save_build(model, tokenizer, identity, staging, out_dir, start)
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(staging, ignore_errors=True)
    on_progress("teacher skills (held-out): " + ", ".join(f"{k} {v:.0%}" for k, v in accuracy.items()))
    logger.info("built the demo teacher in %s in %.0fs", out_dir, time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    """`python -m pipeline.demo_world.base_model DIR [--steps N] [--carry-drop P] [--seed N] ...`.

    Builds in a child process with pinned CPU kernels (as the demo does), unless `--in-process`
    (which is how that child is started). `--spec`/`--recipe` take the whole dataclass as JSON."""
    parser = argparse.ArgumentParser(description="Build the demo's competent base model (cached).")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--spec", type=json.loads, default={}, help="BaseModelSpec fields as JSON")
    parser.add_argument("--recipe", type=json.loads, default={}, help="Recipe fields as JSON")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--carry-drop", type=float)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--peak-lr", type=float)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--in-process", action="store_true", help="build here, with this process's kernels")
    parser.add_argument("--teacher-of", type=Path, help="build the demo's teacher from this base instead")
    parser.add_argument("--teacher-recipe", type=json.loads, default={}, help="TeacherRecipe fields as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    def report(message: str) -> None:
        print(f"{PROGRESS} {message}", flush=True)

    if args.teacher_of is not None:
        build_teacher_model(
            args.out_dir,
            args.teacher_of,
            recipe=TeacherRecipe(**args.teacher_recipe),
            seed=args.seed,
            on_progress=report,
            isolated=not args.in_process,
        )
        if not args.in_process:
            print(json.dumps(read_stamp(args.out_dir), indent=2)[:2000])
        return
    flags = {
        "steps": args.steps,
        "carry_drop": args.carry_drop,
        "batch_size": args.batch_size,
        "peak_lr": args.peak_lr,
    }
    recipe = Recipe(**{**args.recipe, **{k: v for k, v in flags.items() if v is not None}})
    spec = BaseModelSpec(**args.spec)
    build_base_model(
        args.out_dir,
        spec=spec,
        recipe=recipe,
        seed=args.seed,
        on_progress=report,
        isolated=not args.in_process,
    )
    if not args.in_process:
        print(json.dumps(read_stamp(args.out_dir), indent=2)[:2000])


if __name__ == "__main__":
    main()
