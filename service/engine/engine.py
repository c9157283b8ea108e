"""The batched multi-task engine: many tasks' rows, one forward of the shared backbone.

`classify` takes rows that may each belong to a different task (and method), tokenises them
per task (unless they arrive tokenised: `pretokenize`, which serving runs before the queue), builds
the per-method batch tables (`Plan`) from the distinct tasks present, runs the encoder once, and
applies each row's own head.
"""
from __future__ import annotations

import copy
import logging
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from service.engine.backbone import Backbone
from service.engine.bundle import read_bundle
from service.engine.encoder import Plan, State
from service.engine.task import Task, disk_bytes
from service.engine.template import special_frame, start_token
from service.engine.truncation import cut_pairs
from service.engine.types import INLINE_TOKENIZE_CHARS, ClassifyItem, Encoded, Prediction, TaskKey
from service.errors import BundleError, TaskUnavailable
from service.methods.base import REGISTRY
from service.methods.demos import Demo, DemosWeights, SentenceEncoder, bundled_sentence_encoder
from service.methods.exits import ExitBatch, ExitPolicy
from service.methods.head import HeadBatch
from service.methods.verbalizer import VerbalizerBatch

log = logging.getLogger(__name__)

_UNLIMITED = 10**9  # a max_length nothing reaches: count tokens without truncating


@dataclass
class Batch:
    """Token tensors for one forward and the task of each row."""

    input_ids: Tensor  # [B, T]
    attention_mask: Tensor  # [B, T]
    token_type_ids: Tensor | None  # [B, T]
    tasks: list[Task]  # distinct tasks, in first-seen order
    row_part: Tensor  # [B] index into tasks
    answer_pos: Tensor | None = None  # [B] token index a verbalizer reads (template tasks), else None
    part_of_row: list[int] | None = None  # row_part as a host list, where known: reading it back is a device sync


class Engine:
    def __init__(self, backbone: Backbone):
        self.backbone = backbone
        self._tok_lock = threading.Lock()  # HF fast tokenizers are not safe to share across threads
        self._loading_tok = _Locked(backbone.tokenizer, self._tok_lock)  # what task loads read templates with
        self._inline_tok = None  # the event loop's own copy (`pretokenize_inline`), made on first use
        self._inline_lock = threading.Lock()
        self._sentences: SentenceEncoder | None = None  # loaded on first use (tasks with demonstrations)

    # -- tasks ---------------------------------------------------------------------------------
    def load_task(self, bundle_dir: Path, key: TaskKey) -> Task:
        """Read, validate and place one task version on the device (blocking; thread-safe)."""
        spec, weights = read_bundle(Path(bundle_dir), self.backbone.info, key.name, self._loading_tok)
        if "demos" in weights:
            self._check_demos(weights["demos"], key)  # type: ignore[arg-type]
        prompt = 0 if spec.template is None else spec.template.own_tokens(self._loading_tok, self.backbone.info.kind == "decoder")
        return Task(key=key, spec=spec, weights=weights, backbone=self.backbone.info, bytes_on_disk=disk_bytes(Path(bundle_dir)),
                    prompt_tokens=prompt)

    # -- demonstrations (service/methods/demos.py) ----------------------------------------------
    def sentence_encoder(self) -> SentenceEncoder:
        """The sentence encoder that picks demonstrations: the bundled all-MiniLM-L6-v2, loaded
        once (shared by every Engine of the process on this device) on first use."""
        if self._sentences is None:
            self._sentences = bundled_sentence_encoder(self.backbone.device)
        return self._sentences

    def _check_demos(self, demos: DemosWeights, key: TaskKey) -> None:
        enc = self.sentence_encoder()
        if demos.encoder != enc.fingerprint:
            raise BundleError(
                f"task {key.name!r}: its demonstrations were embedded by sentence encoder {demos.encoder[:19]}..., "
                f"but this service selects them with {enc.fingerprint[:19]}... ({enc.name}); the vectors are not comparable"
            )

    def _demonstrations(self, task: Task, items: Sequence[ClassifyItem]) -> list[list[Demo]] | None:
        """Per item, its demonstrations (one per class, nearest by cosine), or None if the task has none."""
        demos = task.weights.get("demos")
        if demos is None:
            return None
        verbalizer = task.weights["verbalizer"]
        texts = [it.text for it in items]
        pairs = [it.text_pair for it in items]
        query = self.sentence_encoder().embed(texts, pairs if task.input_kind == "pair" else None)  # [n, E]
        words = [ids[0] for ids in verbalizer.token_ids]  # type: ignore[attr-defined]  # each label's first word
        return demos.pick(query, texts, pairs, words)  # type: ignore[attr-defined]

    # -- batching ------------------------------------------------------------------------------
    # Serving tokenises a request's rows before they are queued (`pretokenize`), on the event loop
    # when they are short and in a worker thread otherwise, so that the forward thread only pads
    # them into tensors (`collate`): a request of long text pairs (or of a task whose
    # demonstrations need a sentence-encoder forward) no longer holds up every other task's
    # forward, and on a GPU the tokenizer's work overlaps the forward of the batch before.

    def pretokenize(self, items: Sequence[ClassifyItem]) -> list[ClassifyItem]:
        """The same rows, each carrying its tokens (`Encoded`). Blocking, thread-safe (rows queue
        for the shared tokenizer); run it off the event loop."""
        with self._tok_lock:
            encoded = self._encode(items, self.backbone.tokenizer)
        return [replace(it, encoded=e) for it, e in zip(items, encoded)]

    def pretokenize_inline(self, items: Sequence[ClassifyItem]) -> list[ClassifyItem] | None:
        """`pretokenize` done at once by the event loop, on its own copy of the tokenizer, or None
        when the rows are not cheap enough for that: over `INLINE_TOKENIZE_CHARS` characters in all, a task
        with demonstrations (picking them is a sentence-encoder forward), or that copy busy (it
        never waits). The caller then runs `pretokenize` in a thread."""
        if sum(len(it.text) + len(it.text_pair or "") for it in items) > INLINE_TOKENIZE_CHARS:
            return None
        if any("demos" in it.task.weights for it in items):
            return None
        if not self._inline_lock.acquire(blocking=False):
            return None
        try:
            if self._inline_tok is None and not self._copy_tokenizer(wait=False):
                return None
            encoded = self._encode(items, self._inline_tok)
        finally:
            self._inline_lock.release()
        return [replace(it, encoded=e) for it, e in zip(items, encoded)]

    def _copy_tokenizer(self, wait: bool) -> bool:
        """Make the event loop's copy of the tokenizer (read under the shared lock: a call on
        another thread rewrites the tokenizer's truncation settings). False: the lock was busy."""
        if not self._tok_lock.acquire(blocking=wait):
            return False
        try:
            if self._inline_tok is None:
                self._inline_tok = copy.deepcopy(self.backbone.tokenizer)
        finally:
            self._tok_lock.release()
        return True

    def tokenize(self, items: Sequence[ClassifyItem]) -> Batch:
        """The rows as one padded batch, tokenising those that are not yet (`pretokenize`)."""
        todo = [r for r, it in enumerate(items) if it.encoded is None]
        encoded: list[Encoded | None] = [it.encoded for it in items]
        if todo:
            with self._tok_lock:
                for r, e in zip(todo, self._encode([items[r] for r in todo], self.backbone.tokenizer)):
                    encoded[r] = e
        return self.collate(items, encoded)  # type: ignore[arg-type]

    def _encode(self, items: Sequence[ClassifyItem], tok) -> list[Encoded]:
        """Tokenise each row with its own task's max_length (and template); the caller holds
        `tok`'s lock."""
        tasks, row_part = _by_task(items)
        rows_of: list[list[int]] = [[] for _ in tasks]
        for r, j in enumerate(row_part):
            rows_of[j].append(r)
        out: list[Encoded | None] = [None] * len(items)
        causal = self.backbone.info.kind == "decoder"
        # Rows of plain (template-free) tasks with the same max_length and input kind share one
        # tokenizer call: a batch of 32 tasks is one call, not 32.
        plain: dict[tuple[int, bool], list[int]] = {}
        for j, task in enumerate(tasks):
            rows = rows_of[j]
            template = task.spec.template
            if template is not None:  # prompt tasks: template pieces + truncated inputs
                demos = self._demonstrations(task, [items[r] for r in rows])
                for k, r in enumerate(rows):
                    if demos is None:
                        ids, answer = template.encode(tok, items[r].text, items[r].text_pair, task.spec.max_length, causal)
                    else:  # LM-BFF: the input's prompt plus one labelled example per class
                        ids, answer = template.encode_with_demos(tok, items[r].text, items[r].text_pair, demos[k],
                                                                 task.spec.max_length, causal)
                    out[r] = Encoded(ids, None, answer)
                continue
            plain.setdefault((task.spec.max_length, task.input_kind == "pair"), []).extend(rows)
        for (max_length, is_pair), rows in plain.items():
            texts = [items[r].text for r in rows]
            pairs = [items[r].text_pair for r in rows] if is_pair else None
            if pairs is not None:  # the tokenizer's own pair truncation is slow on long sides
                texts, pairs = cut_pairs(tok, texts, pairs, max_length)  # type: ignore[arg-type]
            # Longer inputs are truncated to the task's max_length (documented per task);
            # the HTTP layer refuses over-long *characters* before we get here.
            enc = tok(texts, pairs, truncation=True, max_length=max_length)
            types = enc["token_type_ids"] if "token_type_ids" in enc else None
            for k, r in enumerate(rows):
                ids, row_types = enc["input_ids"][k], None if types is None else types[k]
                if not ids:  # an empty input, on a tokenizer that adds no special tokens (SmolLM2's):
                    ids, row_types = [start_token(tok)], None  # read as a template prompt with no tokens is
                out[r] = Encoded(ids, row_types, 0)
        return out  # type: ignore[return-value]

    def collate(self, items: Sequence[ClassifyItem], encoded: Sequence[Encoded]) -> Batch:
        """Right-pad the rows' tokens to one length: the forward's tensors, and the task of each row."""
        tasks, row_part = _by_task(items)
        tok = self.backbone.tokenizer
        t = max(len(e.ids) for e in encoded)
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        # right-pad in Python, then one tensor each (not a tensor op per row)
        input_ids = torch.tensor([e.ids + [pad] * (t - len(e.ids)) for e in encoded], dtype=torch.long)
        mask = torch.tensor([[1] * len(e.ids) + [0] * (t - len(e.ids)) for e in encoded], dtype=torch.long)
        tt = None
        if self.backbone.family.embeddings.token_type is not None:
            tt = torch.tensor([(e.types if e.types is not None else [0] * len(e.ids)) + [0] * (t - len(e.ids)) for e in encoded],
                              dtype=torch.long)
        dev = self.backbone.device
        return Batch(
            input_ids=input_ids.to(dev),
            attention_mask=mask.to(dev),
            token_type_ids=None if tt is None else tt.to(dev),
            tasks=tasks,
            row_part=torch.tensor(row_part, dtype=torch.long, device=dev),
            answer_pos=torch.tensor([e.answer for e in encoded], dtype=torch.long, device=dev),
            part_of_row=row_part,
        )

    def token_counts(self, items: Sequence[ClassifyItem]) -> list[int]:
        """Per row: its length in tokens before any truncation (special tokens, and a prompt
        task's template, included), by the tokenizer and template `tokenize` uses. The service
        checks tasks whose `overflow` is `refuse` with this before their rows are queued.

        A row already tokenised (`pretokenize`) to fewer tokens than its task's max_length, less
        the specials a causal template may drop from its end, was not cut: its length is its count,
        with no second pass through the tokenizer. Only rows that reached the limit are counted
        again without truncation."""
        tok = self.backbone.tokenizer
        causal = self.backbone.info.kind == "decoder"
        slack = len(special_frame(tok)[1]) if causal else 0
        counts: list[int | None] = [
            len(it.encoded.ids) if it.encoded is not None and len(it.encoded.ids) < it.task.spec.max_length - slack
            and "demos" not in it.task.weights else None  # demonstrations are in its tokens, not its count
            for it in items]
        todo = [r for r, c in enumerate(counts) if c is None]
        if todo:
            with self._tok_lock:
                for r in todo:
                    it = items[r]
                    template = it.task.spec.template
                    if template is not None:  # demonstrations are not counted: they are cut to fit, by design
                        ids, _ = template.encode(tok, it.text, it.text_pair, _UNLIMITED, causal)
                    else:
                        ids = tok(it.text, it.text_pair, truncation=False, verbose=False)["input_ids"]
                    counts[r] = len(ids)
        return counts  # type: ignore[return-value]

    def plan(self, tasks: Sequence[Task], row_part: Tensor, dropout: float = 0.0,
             part_of_row: list[int] | None = None) -> tuple[Plan, "Outputs"]:
        """Per-method tables for the tasks of one batch; the head batch is returned apart.
        `dropout` is for training forwards only (`Plan.dropout`); `part_of_row` is row_part on the
        host, if the caller has it."""
        batches = []
        for name, method in sorted(REGISTRY.items(), key=lambda kv: kv[1].order):
            if method.stage != "encoder":
                continue
            b = method.batch([t.weights.get(name) for t in tasks], row_part)
            if b is not None:
                batches.append(b)
        outputs = [REGISTRY[name].batch([t.weights.get(name) for t in tasks], row_part) for name in ("head", "verbalizer")]
        for out in outputs:
            if out is not None:
                out.part_of_row = part_of_row  # type: ignore[attr-defined]
        return Plan(tuple(batches), dropout), Outputs(*outputs)  # type: ignore[arg-type]

    def _exit_batch(self, batch: Batch, policies: Sequence[ExitPolicy | None] | None) -> ExitBatch | None:
        parts = [t.weights.get("exits") for t in batch.tasks]
        if all(p is None for p in parts):
            return None
        rows: list[ExitPolicy | None] = []
        for r, j in enumerate(batch.row_part.tolist()):
            ew = parts[j]
            override = policies[r] if policies is not None else None
            rows.append(None if ew is None else (override or ew.policy))  # type: ignore[union-attr]
        return REGISTRY["exits"].batch_rows(parts, batch.row_part, rows)  # type: ignore[attr-defined]

    # -- forward -------------------------------------------------------------------------------
    def encode(self, batch: Batch, dropout: float = 0.0) -> tuple[State, "Outputs"]:
        """Full-depth forward (no early exit): final states and the batch's output stage."""
        plan, outputs = self.plan(batch.tasks, batch.row_part, dropout)
        outputs.answer = batch.answer_pos
        st = self.backbone.encoder.forward(batch.input_ids, batch.attention_mask, batch.token_type_ids, plan)
        return st, outputs

    def full_depth_logits(self, batch: Batch, dropout: float = 0.0) -> list[Tensor]:
        """Per row: its task's logits through every layer, differentiable (training uses this:
        the same modules the service runs, gradients flowing into the task tensors)."""
        st, outputs = self.encode(batch, dropout)
        return outputs.logits(st, self._pooler(), self.backbone.lm_head)

    def layer_states(self, batch: Batch, dropout: float = 0.0) -> tuple[list[State], list[Tensor]]:
        """The full-depth forward, keeping the state after every layer: (states [num_layers], per-row
        logits of the task head). The logits are exactly `full_depth_logits(batch)`; the states are
        what `run` shows the exit classifiers after each layer. Differentiable (training uses it)."""
        plan, outputs = self.plan(batch.tasks, batch.row_part, dropout)
        outputs.answer = batch.answer_pos
        enc = self.backbone.encoder
        st = enc.embed(batch.input_ids, batch.attention_mask, batch.token_type_ids, plan)
        states = []
        for i in range(enc.num_layers):  # Encoder.forward, layer by layer
            st = enc.layer(i, st)
            states.append(st)
        return states, outputs.logits(enc.finish(st), self._pooler(), self.backbone.lm_head)

    def run(self, batch: Batch, policies: Sequence[ExitPolicy | None] | None = None) -> list[tuple[Tensor, int]]:
        """Per row: (its task's logits, the 1-based layer that answered).

        Rows of tasks with early-exit classifiers may leave after any layer; they are then removed
        from the batch (compaction), so later layers really run on fewer rows. Everything else
        runs to the last layer and is answered by its task's head.
        """
        enc = self.backbone.encoder
        n_layers = enc.num_layers
        plan, head = self.plan(batch.tasks, batch.row_part, part_of_row=batch.part_of_row)
        if head.head is None and head.verbalizer is None:
            raise RuntimeError("no task in this batch has a classification head or verbalizer")
        head.answer = batch.answer_pos
        exits = self._exit_batch(batch, policies)
        out: list[tuple[Tensor, int] | None] = [None] * batch.input_ids.shape[0]
        ids = list(range(batch.input_ids.shape[0]))  # the original row of each row still running
        st = enc.embed(batch.input_ids, batch.attention_mask, batch.token_type_ids, plan)
        for i in range(n_layers):
            st = enc.layer(i, st)
            if exits is None or i == n_layers - 1:
                continue
            leave, logits = exits.decide(i, st.hidden, st.keep, st.text_start, st.text_len)
            if not bool(leave.any()):
                continue
            for r, z in logits.items():
                out[ids[r]] = (z, i + 1)
            stay = (~leave).nonzero().squeeze(1)
            kept = stay.tolist()
            if not kept:
                break
            ids = [ids[k] for k in kept]
            st, head, exits = st.select(stay), head.select(stay), exits.select(stay)
        else:
            st = enc.finish(st)
            final = head.logits(st, self._pooler(), self.backbone.lm_head)
            for r, z in enumerate(final):
                out[ids[r]] = (z, n_layers)
        return _to_host(out)  # type: ignore[arg-type]

    def logits(self, batch: Batch, policies: Sequence[ExitPolicy | None] | None = None) -> list[Tensor]:
        """Per row: its task's logits (fp32, on CPU)."""
        with torch.inference_mode():
            return [z for z, _ in self.run(batch, policies)]

    def _pooler(self):
        return self.backbone.family.pooler

    def classify(self, items: Sequence[ClassifyItem]) -> list[Prediction | TaskUnavailable]:
        """One batched forward over rows of any tasks; blocking (run it in a worker thread).

        A row whose logits are not finite gets a `TaskUnavailable` instead of a Prediction (the
        scheduler fails that row's request alone): weights that pass every bundle check can still
        overflow in arithmetic (a head of 3e38s), and a NaN score must never reach a response."""
        if not items:
            return []
        batch = self.tokenize(items)
        policies = [it.exit_policy for it in items]
        with torch.inference_mode():
            rows = self.run(batch, policies if any(p is not None for p in policies) else None)
        preds: list[Prediction | TaskUnavailable] = []
        overflowed: set[TaskKey] = set()
        # One check over every row's logits (one sync); rows are looked at one by one only if it fails.
        all_finite = bool(torch.isfinite(torch.cat([z.reshape(-1) for z, _ in rows])).all())
        for it, (z, layer) in zip(items, rows):
            if not all_finite and not bool(torch.isfinite(z).all()):
                key = it.task.key
                overflowed.add(key)
                preds.append(TaskUnavailable(
                    f"task {key.name!r} (version {key.version}) cannot answer: its weights produce non-finite "
                    f"scores (NaN or Inf logits at layer {layer}); publish a version with sane weights"))
                continue
            p = torch.softmax(z, dim=-1)
            labels = it.task.labels
            best = int(p.argmax())
            preds.append(
                Prediction(
                    label=labels[best],
                    score=float(p[best]),
                    scores={lab: float(v) for lab, v in zip(labels, p)},
                    version=it.task.key.version,
                    logits=tuple(float(v) for v in z),
                    exit_layer=layer,
                )
            )
        for key in sorted(overflowed):
            log.warning("task %s: its weights produce non-finite logits; its rows were refused", key)
        return preds

    def warmup(self) -> None:
        """One real forward through the backbone (readiness means this has succeeded), and the
        event loop's tokenizer copy made before the first request."""
        self._copy_tokenizer(wait=True)
        tok = self.backbone.tokenizer
        enc = tok(["warm up"], return_tensors="pt")
        dev = self.backbone.device
        with torch.inference_mode():
            self.backbone.encoder.forward(
                enc["input_ids"].to(dev),
                enc["attention_mask"].to(dev),
                enc["token_type_ids"].to(dev) if "token_type_ids" in enc and self.backbone.family.embeddings.token_type is not None else None,
                Plan(),
            )


def _by_task(items: Sequence[ClassifyItem]) -> tuple[list[Task], list[int]]:
    """The distinct tasks of the rows, in first-seen order, and each row's index among them."""
    tasks: list[Task] = []
    index: dict[int, int] = {}
    row_part = []
    for it in items:
        j = index.setdefault(id(it.task), len(tasks))
        if j == len(tasks):
            tasks.append(it.task)
        row_part.append(j)
    return tasks, row_part


class _Locked:
    """The shared tokenizer for callers outside the engine's own locked sections (task loads, on
    the cache's loader threads, checking that a template fits): every call holds the tokenizer
    lock. A fast tokenizer rewrites its truncation settings on every call, so a load's unlocked
    call landing inside a request's tokenising turned that request's truncation off: rows queued
    at full length, answered from the wrong tokens, or past the position table (a 500 for the
    whole batch)."""

    def __init__(self, tokenizer, lock: threading.Lock):
        self._tokenizer = tokenizer
        self._lock = lock

    def __call__(self, *args, **kwargs):
        with self._lock:
            return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name: str):
        attr = getattr(self._tokenizer, name)
        if not callable(attr):
            return attr

        def locked(*args, **kwargs):
            with self._lock:
                return attr(*args, **kwargs)

        return locked


class Outputs:
    """The output stage of one batch: per-task heads and/or verbalizers, compacted together."""

    def __init__(self, head: HeadBatch | None, verbalizer: VerbalizerBatch | None, answer: Tensor | None = None):
        self.head = head
        self.verbalizer = verbalizer
        self.answer = answer  # [B] answer positions (relative to the text start)

    def select(self, rows: Tensor) -> "Outputs":
        return Outputs(
            None if self.head is None else self.head.select(rows),
            None if self.verbalizer is None else self.verbalizer.select(rows),
            None if self.answer is None else self.answer.index_select(0, rows),
        )

    def logits(self, st: State, pooler, lm_head) -> list[Tensor]:
        n = st.hidden.shape[0]
        out: list[Tensor | None] = [None] * n
        if self.head is not None:
            out = self.head.logits(st.hidden, st.keep, st.text_start, st.text_len, pooler, st.plan)
        if self.verbalizer is not None:
            answer = st.text_start + (self.answer if self.answer is not None else torch.zeros_like(st.text_start))
            for r, z in enumerate(self.verbalizer.logits(st.hidden, answer, lm_head)):
                if z is not None:
                    out[r] = z
        return out  # type: ignore[return-value]


def _to_host(rows: Sequence[tuple[Tensor, int]]) -> list[tuple[Tensor, int]]:
    """Every row's logits as fp32 on the CPU, in one device-to-host copy: one sync per batch
    rather than a cast, a copy and a sync per row (on a GPU those were 64 of a batch's ~270 ops)."""
    if not rows:
        return []
    zs = [z if z.dim() == 1 else z.reshape(-1) for z, _ in rows]
    parts = torch.cat(zs).float().cpu().split([z.numel() for z in zs])  # cat promotes mixed dtypes
    return [(p if z.dim() == 1 else p.view(z.shape), layer) for p, (z, layer) in zip(parts, rows)]
