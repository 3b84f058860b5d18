"""Text preference pairs (prompt, chosen, rejected) from local files or Hugging Face datasets.

Supported record formats (``format="auto"`` detects them from the first record):

``trl``
    TRL's preference format. *Explicit*: ``prompt``/``chosen``/``rejected``
    strings. *Implicit prompt*: only ``chosen``/``rejected``; the prompt is
    their exact character-level longest common prefix, and, as TRL's
    ``extract_prompt`` does, a space that ends that prefix is moved to the
    completions. *Conversational*: ``chosen``/``rejected`` (and optionally
    ``prompt``) are lists of ``{"role", "content"}`` messages; without a
    ``prompt`` the prompt is the longest common prefix of the two message lists
    (trailing assistant messages are moved back to the completions). The prompt
    messages are rendered with ``tokenizer.apply_chat_template(...,
    add_generation_prompt=True)`` when a tokenizer with a chat template is
    given, else with :func:`render_chat_fallback`; the completion is the
    content of the assistant message(s) after the prompt.
``hh-rlhf``
    Anthropic HH raw dialogues (``chosen``/``rejected`` only, each starting
    with ``"\\n\\nHuman:"``). The prompt is the shared text up to and including
    the last ``"\\n\\nAssistant:"`` of the common prefix; completions are the
    rest, **with their leading space kept**, so ``prompt + chosen`` is exactly
    the raw chosen dialogue. (Byte-level BPE tokenizers encode ``" word"`` as
    one token, so tokenizing prompt and completion separately then matches
    tokenizing the whole dialogue.)
``pandalm``
    PandaLM test set: prompt is ``"{instruction}\\n\\n{input}"``, or just the
    instruction when ``input`` is blank. ``pandalm_mode="votes"``: one pair
    per non-tie annotator vote (column ``annotator``); ``"majority"``: one pair
    per item by majority of non-tie votes (columns ``votes_chosen``,
    ``votes_rejected``). Column ``application`` is ``motivation_app``.
``shp``
    Stanford SHP: prompt is ``history``; the preferred of ``human_ref_A``/
    ``human_ref_B`` by ``labels`` (1 = A) or else by ``score_A``/``score_B``.
``ultrafeedback``
    HuggingFaceH4/ultrafeedback_binarized: ``chosen``/``rejected`` are message
    lists ending with the assistant turn; the prompt is rendered from the
    messages before it (or from the ``prompt`` string when there are none).

Degenerate pairs are dropped and counted in ``stats``, never raised: non-string
responses, empty responses (after ``strip``), identical responses (after
``strip``) and ties (equal votes or scores). Unconsumed scalar fields of a
record (e.g. ``category``, ``domain``) are kept as columns.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from distdpo.data.readers import DataFormatError, Malformed, records

FORMATS = ("auto", "trl", "hh-rlhf", "pandalm", "shp", "ultrafeedback")
PANDALM_MODES = ("votes", "majority")
ON_ERROR = ("raise", "skip")

_HUMAN = "\n\nHuman:"
_ASSISTANT = "\n\nAssistant:"
_SCALAR = (str, int, float, bool, type(None))
_STAT_KEYS = (
    "raw_records",
    "pairs",
    "dropped_empty",
    "dropped_identical",
    "dropped_non_string",
    "dropped_ties",
    "skipped_malformed",
)
# What auto-detection looks for, in the order it checks (shown in errors).
_KEY_SETS = {
    "pandalm": ("instruction", "response1", "response2", "annotator1"),
    "shp": ("history", "human_ref_A", "human_ref_B"),
    "ultrafeedback": ("prompt (string)", "chosen (messages)", "rejected (messages)"),
    "hh-rlhf": ("chosen (dialogue starting '\\n\\nHuman:')", "rejected (dialogue)"),
    "trl": ("[prompt]", "chosen", "rejected"),
}


@dataclass
class TextPreferenceData:
    """Preference pairs as parallel lists, with per-pair metadata columns and load statistics."""

    prompt: list[str]
    chosen: list[str]
    rejected: list[str]
    columns: dict[str, list] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompt)

    def select(self, indices: Sequence[int]) -> TextPreferenceData:
        """The pairs at ``indices`` (in that order); ``stats`` are those of the full load."""
        idx = [int(i) for i in indices]
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        return TextPreferenceData(
            pick(self.prompt),
            pick(self.chosen),
            pick(self.rejected),
            {k: pick(v) for k, v in self.columns.items()},
            dict(self.stats),
        )

    def concat(self, other: TextPreferenceData) -> TextPreferenceData:
        """These pairs, then ``other``'s (the columns both have; ``stats`` are this load's)."""
        columns = {k: v + other.columns[k] for k, v in self.columns.items() if k in other.columns}
        return TextPreferenceData(
            self.prompt + other.prompt,
            self.chosen + other.chosen,
            self.rejected + other.rejected,
            columns,
            dict(self.stats),
        )

    def column(self, name: str) -> list:
        """One metadata column; KeyError naming the available ones."""
        try:
            return self.columns[name]
        except KeyError:
            raise KeyError(f"no column {name!r}; available columns: {sorted(self.columns)}") from None


# ---------------------------------------------------------------------------
# format detection


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(isinstance(m, dict) for m in value)


def _detect(record: Any) -> str | None:
    if not isinstance(record, dict):
        return None
    keys = record.keys()
    if {"instruction", "response1", "response2"} <= keys:
        return "pandalm"
    if {"history", "human_ref_A", "human_ref_B"} <= keys:
        return "shp"
    if {"chosen", "rejected"} <= keys:
        chosen, rejected = record["chosen"], record["rejected"]
        if isinstance(record.get("prompt"), str) and _is_messages(chosen):
            return "ultrafeedback"
        if "prompt" not in keys and all(
            isinstance(t, str) and t.startswith(_HUMAN) and _ASSISTANT in t for t in (chosen, rejected)
        ):
            return "hh-rlhf"
        return "trl"
    return None


def _undetectable(record: Any) -> str:
    got = sorted(record) if isinstance(record, dict) else type(record).__name__
    sets = "; ".join(f"{name}: {', '.join(keys)}" for name, keys in _KEY_SETS.items())
    return f"cannot detect the format of a record with keys {got}; recognised key sets are {sets}"


def detect_format(record: dict) -> str:
    """The format name (one of ``FORMATS`` except ``"auto"``) of one raw record."""
    name = _detect(record)
    if name is None:
        raise DataFormatError(_undetectable(record))
    return name


# ---------------------------------------------------------------------------
# chat rendering


def render_chat_fallback(messages: Sequence[dict]) -> str:
    """Plain prompt template used when no chat template is available.

    Each message becomes ``"{Role}: {content}"`` (``user`` → ``User``,
    ``assistant`` → ``Assistant``, other roles capitalized), joined by blank
    lines, followed by the generation cue ``"\\n\\nAssistant:"`` (just
    ``"Assistant:"`` for an empty list). Completions rendered with this template
    get one leading space, so ``prompt + completion`` reads like the template
    applied to the whole conversation (the same rule as HH-RLHF).
    """
    turns = [f"{_role_name(m['role'])}: {m['content']}" for m in messages]
    return "\n\n".join(turns + ["Assistant:"])


def _role_name(role: str) -> str:
    return {"user": "User", "assistant": "Assistant", "system": "System"}.get(role, role.capitalize())


def _check_messages(value: Any, name: str) -> list[dict]:
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise Malformed(f"field {name!r} must be a list of {{'role', 'content'}} messages")
    for m in value:
        if not isinstance(m.get("role"), str) or "content" not in m:
            raise Malformed(f"field {name!r}: every message needs a string 'role' and a 'content'")
    return value


class _Renderer:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer if getattr(tokenizer, "chat_template", None) else None

    def prompt(self, messages: list[dict], field_name: str) -> str:
        if any(not isinstance(m["content"], str) for m in messages):
            raise Malformed(f"field {field_name!r}: prompt message contents must be strings")
        if self.tokenizer is not None:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return render_chat_fallback(messages)

    def completion(self, messages: list[dict], field_name: str) -> Any:
        """Content of the assistant messages; a non-string content is returned as is (dropped later)."""
        if not messages:
            return ""
        if any(m["role"] != "assistant" for m in messages):
            raise Malformed(f"field {field_name!r}: the completion must be assistant message(s)")
        contents = [m["content"] for m in messages]
        if any(not isinstance(c, str) for c in contents):
            return next(c for c in contents if not isinstance(c, str))
        text = "\n\n".join(contents)
        return text if self.tokenizer is not None else " " + text


# ---------------------------------------------------------------------------
# converters: record -> list of (prompt, chosen, rejected, meta) or drop reasons


def _require(record: dict, *names: str, fmt: str) -> None:
    for name in names:
        if name not in record:
            raise Malformed(f"missing field {name!r} ({fmt} records need {', '.join(names)})")


def _extras(record: dict, consumed: set[str]) -> dict:
    return {k: v for k, v in record.items() if k not in consumed and isinstance(v, _SCALAR)}


def _common_prefix_len(a: Sequence, b: Sequence) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _trl(record: dict, ctx: _Context) -> list:
    _require(record, "chosen", "rejected", fmt="trl")
    chosen, rejected = record["chosen"], record["rejected"]
    meta = _extras(record, {"prompt", "chosen", "rejected"})
    prompt = record.get("prompt")
    if isinstance(chosen, list) or isinstance(rejected, list) or isinstance(prompt, list):
        c_msgs = _check_messages(chosen, "chosen")
        r_msgs = _check_messages(rejected, "rejected")
        if prompt is None:
            k = _common_prefix_len(c_msgs, r_msgs)
            # the completion should be whole assistant turns, not start mid-answer
            while k > 0 and c_msgs[k - 1]["role"] == "assistant":
                k -= 1
            p_msgs, c_msgs, r_msgs = c_msgs[:k], c_msgs[k:], r_msgs[k:]
        else:
            p_msgs = _check_messages(prompt, "prompt")
        return [
            (
                ctx.render.prompt(p_msgs, "prompt"),
                ctx.render.completion(c_msgs, "chosen"),
                ctx.render.completion(r_msgs, "rejected"),
                meta,
            )
        ]
    if "prompt" in record:
        if not isinstance(prompt, str):
            raise Malformed(f"field 'prompt' must be a string or a list of messages, got {type(prompt).__name__}")
        return [(prompt, chosen, rejected, meta)]
    if not (isinstance(chosen, str) and isinstance(rejected, str)):
        return [(None, chosen, rejected, meta)]  # dropped as non-string
    k = _common_prefix_len(chosen, rejected)
    if k > 0 and chosen[k - 1] == " ":
        k -= 1  # as TRL: the separating space belongs to the completions
    return [(chosen[:k], chosen[k:], rejected[k:], meta)]


def _hh(record: dict, ctx: _Context) -> list:
    _require(record, "chosen", "rejected", fmt="hh-rlhf")
    chosen, rejected = record["chosen"], record["rejected"]
    meta = _extras(record, {"chosen", "rejected"})
    if not (isinstance(chosen, str) and isinstance(rejected, str)):
        return [(None, chosen, rejected, meta)]
    common = chosen[: _common_prefix_len(chosen, rejected)]
    cut = common.rfind(_ASSISTANT)
    if cut < 0:
        raise Malformed(f"HH dialogues share no {_ASSISTANT!r} turn, so no prompt can be split off")
    cut += len(_ASSISTANT)
    # Conversation depth, a natural label to split clients by (HH has no user or topic column).
    meta = {**meta, "turns": chosen[:cut].count("\n\nHuman:")}
    return [(chosen[:cut], chosen[cut:], rejected[cut:], meta)]


def _pandalm(record: dict, ctx: _Context) -> list:
    _require(record, "instruction", "response1", "response2", fmt="pandalm")
    instruction, extra = record["instruction"], record.get("input", "")
    if not isinstance(instruction, str):
        raise Malformed(f"field 'instruction' must be a string, got {type(instruction).__name__}")
    if extra is None:
        extra = ""
    if not isinstance(extra, str):
        raise Malformed(f"field 'input' must be a string, got {type(extra).__name__}")
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    annotators = sorted(
        (k for k in record if k.startswith("annotator") and k[len("annotator") :].isdigit()),
        key=lambda k: int(k[len("annotator") :]),
    )
    if not annotators:
        raise Malformed("missing field 'annotator1' (pandalm records need annotator1..N votes)")
    votes = {}
    for name in annotators:
        v = record[name]
        if isinstance(v, bool) or v not in (0, 1, 2):
            raise Malformed(f"field {name!r} must be 0 (tie), 1 or 2, got {v!r}")
        votes[name] = int(v)
    responses = {1: record["response1"], 2: record["response2"]}
    meta = _extras(record, {"instruction", "input", "response1", "response2", "motivation_app", *annotators})
    if "motivation_app" in record:
        meta = {"application": record["motivation_app"], **meta}
    out: list = []
    if ctx.pandalm_mode == "votes":
        for name, v in votes.items():
            out.append("tie" if v == 0 else (prompt, responses[v], responses[3 - v], {"annotator": name, **meta}))
        return out
    ones = sum(v == 1 for v in votes.values())
    twos = sum(v == 2 for v in votes.values())
    if ones == twos:
        return ["tie"]
    win = 1 if ones > twos else 2
    return [
        (
            prompt,
            responses[win],
            responses[3 - win],
            {**meta, "votes_chosen": max(ones, twos), "votes_rejected": min(ones, twos)},
        )
    ]


def _number(record: dict, name: str) -> float | None:
    v = record.get(name)
    if v is None or v == "":
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        raise Malformed(f"field {name!r} must be a number, got {v!r}") from None


def _shp(record: dict, ctx: _Context) -> list:
    _require(record, "history", "human_ref_A", "human_ref_B", fmt="shp")
    history = record["history"]
    if not isinstance(history, str):
        raise Malformed(f"field 'history' must be a string, got {type(history).__name__}")
    label, score_a, score_b = _number(record, "labels"), _number(record, "score_A"), _number(record, "score_B")
    have_scores = score_a is not None and score_b is not None
    if label is None and not have_scores:
        raise Malformed("missing field 'labels' (or both 'score_A' and 'score_B')")
    if have_scores and score_a == score_b:
        return ["tie"]
    a_wins = label == 1 if label is not None else score_a > score_b
    a, b = record["human_ref_A"], record["human_ref_B"]
    meta = _extras(record, {"history", "human_ref_A", "human_ref_B", "labels", "score_A", "score_B"})
    return [(history, a, b, meta) if a_wins else (history, b, a, meta)]


def _ultrafeedback(record: dict, ctx: _Context) -> list:
    _require(record, "chosen", "rejected", fmt="ultrafeedback")
    c_msgs = _check_messages(record["chosen"], "chosen")
    r_msgs = _check_messages(record["rejected"], "rejected")
    for name, msgs in (("chosen", c_msgs), ("rejected", r_msgs)):
        if not msgs or msgs[-1]["role"] != "assistant":
            raise Malformed(f"field {name!r} must end with an assistant message")
    meta = _extras(record, {"prompt", "chosen", "rejected", "messages"})
    sc, sr = _number(record, "score_chosen"), _number(record, "score_rejected")
    if sc is not None and sr is not None and sc == sr:
        return ["tie"]
    context = c_msgs[:-1]
    if not context:
        prompt = record.get("prompt")
        if not isinstance(prompt, str):
            raise Malformed("missing field 'prompt' (needed when 'chosen' holds only the assistant turn)")
        context = [{"role": "user", "content": prompt}]
    return [
        (
            ctx.render.prompt(context, "chosen"),
            ctx.render.completion(c_msgs[-1:], "chosen"),
            ctx.render.completion(r_msgs[-1:], "rejected"),
            meta,
        )
    ]


_CONVERTERS = {"trl": _trl, "hh-rlhf": _hh, "pandalm": _pandalm, "shp": _shp, "ultrafeedback": _ultrafeedback}


@dataclass
class _Context:
    render: _Renderer
    pandalm_mode: str


# ---------------------------------------------------------------------------
# public entry point


def load_preferences(
    source: str | os.PathLike,
    format: str = "auto",
    *,
    on_error: str = "raise",
    split: str | None = None,
    tokenizer: Any = None,
    pandalm_mode: str = "votes",
    max_records: int | None = None,
) -> TextPreferenceData:
    """Load preference pairs from a local file or a Hugging Face dataset id.

    ``source``: a ``.jsonl``/``.jsonl.gz``/``.json`` (list or JSON lines)/
    ``.parquet``/``.csv`` file, else a dataset id for ``datasets.load_dataset``
    (with ``split``, default ``"train"``; ``split`` is ignored for files).
    ``on_error``: ``"raise"`` on the first malformed record, or ``"skip"`` and
    count it. ``max_records`` caps the raw records read. See the module
    docstring for the formats.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; expected one of {FORMATS}")
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    if pandalm_mode not in PANDALM_MODES:
        raise ValueError(f"pandalm_mode must be one of {PANDALM_MODES}, got {pandalm_mode!r}")
    if max_records is not None and max_records < 0:
        raise ValueError(f"max_records must be >= 0, got {max_records}")

    ctx = _Context(_Renderer(tokenizer), pandalm_mode)
    stats = dict.fromkeys(_STAT_KEYS, 0)
    prompts: list[str] = []
    chosen: list[str] = []
    rejected: list[str] = []
    metas: list[dict] = []
    fmt = None if format == "auto" else format

    for index, (where, record) in enumerate(records(source, split, max_records)):
        if max_records is not None and index >= max_records:
            break
        stats["raw_records"] += 1
        try:
            if isinstance(record, Malformed):
                raise record
            if not isinstance(record, dict):
                raise Malformed(f"expected an object (a dict of fields), got {type(record).__name__}")
            if fmt is None:
                fmt = _detect(record)
                if fmt is None:
                    raise DataFormatError(f"{where}: {_undetectable(record)}")
            outcomes = _CONVERTERS[fmt](record, ctx)
        except Malformed as e:
            if on_error == "raise":
                raise DataFormatError(f"{where}: {e}") from None
            stats["skipped_malformed"] += 1
            continue
        for out in outcomes:
            if out == "tie":
                stats["dropped_ties"] += 1
                continue
            p, c, r, meta = out
            if not (isinstance(c, str) and isinstance(r, str)):
                stats["dropped_non_string"] += 1
            elif not c.strip() or not r.strip():
                stats["dropped_empty"] += 1
            elif c.strip() == r.strip():
                stats["dropped_identical"] += 1
            else:
                prompts.append(p)
                chosen.append(c)
                rejected.append(r)
                metas.append({**meta, "source_index": index})

    if stats["raw_records"] == 0 and format == "auto" and max_records != 0:
        raise DataFormatError(f"{os.fspath(source)}: no records found")
    stats["pairs"] = len(prompts)
    names: dict[str, None] = {}
    for meta in metas:
        names.update(dict.fromkeys(meta))
    names.pop("source_index", None)
    columns = {name: [m.get(name) for m in metas] for name in names}
    columns["source_index"] = [m["source_index"] for m in metas]
    return TextPreferenceData(prompts, chosen, rejected, columns, stats)


__all__ = [
    "FORMATS",
    "DataFormatError",
    "TextPreferenceData",
    "detect_format",
    "load_preferences",
    "render_chat_fallback",
]
