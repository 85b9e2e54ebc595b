"""Edit-record formats, each converted to :class:`~lit_prune.requests.EditRequest`.

Supported (detected from the first record's fields, or named with ``fmt``):

``"counterfact"`` (ROME format)
    ``{"case_id", "requested_rewrite": {"prompt": "... {} ...", "subject", "target_new": {"str"},
    "target_true": {"str"}}, "paraphrase_prompts": [...], "neighborhood_prompts": [...]}``
``"easyedit"`` (EasyEdit CounterFact)
    ``{"case_id", "prompt": full prompt with the subject, "subject", "target_new", "ground_truth",
    "rephrase_prompt", "locality_prompt", "locality_ground_truth"}``. The locality prompt is about another subject
    with the same relation, so locality is scored CounterFact-style (true object vs new object).
``"zsre"`` (MEND format)
    ``{"subject", "src": question, "alt": new answer, "answers": [old answers], "rephrase", "loc": "nq question: ...",
    "loc_ans"}``. The question becomes the prompt; locality is token agreement on the NQ question.
``"lit_prune"`` (this project's own format, the bundled demo set)
    the :class:`EditRequest` fields directly: ``{"case_id", "prompt": "... {} ...", "subject", "target_new",
    "target_true", "paraphrase_prompts": [...], "neighborhood_prompts": [...]}``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping

from ..requests import EditRequest, EditRequestError, template_from_prompt

FORMATS = ("counterfact", "easyedit", "zsre", "lit_prune")


def detect_format(record: Mapping[str, Any], where: str = "record") -> str:
    """Name of the format of one record (see the module docstring); ``where`` names the record in the error."""
    if "requested_rewrite" in record:
        return "counterfact"
    if "ground_truth" in record or "rephrase_prompt" in record:
        return "easyedit"
    if "src" in record and "alt" in record:
        return "zsre"
    if "prompt" in record and "target_new" in record:
        return "lit_prune"
    raise EditRequestError(
        f"{where}: cannot tell the format of a record with fields {sorted(record)}; known formats: "
        f"{', '.join(FORMATS)} (see lit_prune.data.formats); name one with --data.format"
    )


def _need(rec: Mapping[str, Any], key: str, where: str, kind: type | tuple = str) -> Any:
    if key not in rec:
        raise EditRequestError(f"{where}: missing field '{key}'")
    v = rec[key]
    if not isinstance(v, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise EditRequestError(f"{where}: field '{key}' must be {names}, got {type(v).__name__}")
    return v


def _str_list(rec: Mapping[str, Any], key: str, where: str) -> list[str]:
    v = rec.get(key, [])
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise EditRequestError(f"{where}: field '{key}' must be a string or a list of strings")
    return [x for x in v if x.strip()]


def _from_counterfact(rec: Mapping[str, Any], where: str) -> EditRequest:
    rw = _need(rec, "requested_rewrite", where, dict)
    w = f"{where}.requested_rewrite"
    tn, tt = _need(rw, "target_new", w, dict), _need(rw, "target_true", w, dict)
    return EditRequest(
        prompt=_need(rw, "prompt", w),
        subject=_need(rw, "subject", w),
        target_new=_need(tn, "str", f"{w}.target_new"),
        target_true=_need(tt, "str", f"{w}.target_true"),
        case_id=rec.get("case_id"),
        paraphrase_prompts=_str_list(rec, "paraphrase_prompts", where),
        neighborhood_prompts=_str_list(rec, "neighborhood_prompts", where),
    )


def _from_easyedit(rec: Mapping[str, Any], where: str) -> EditRequest:
    subject = _need(rec, "subject", where)
    prompt = _need(rec, "prompt", where)
    return EditRequest(
        prompt=template_from_prompt(prompt, subject, f"{where}: field 'prompt'"),
        subject=subject,
        target_new=_need(rec, "target_new", where),
        target_true=_need(rec, "ground_truth", where),
        case_id=rec.get("case_id"),
        paraphrase_prompts=_str_list(rec, "rephrase_prompt", where),
        neighborhood_prompts=_str_list(rec, "locality_prompt", where),
    )


def _from_zsre(rec: Mapping[str, Any], where: str) -> EditRequest:
    subject = _need(rec, "subject", where)
    answers = rec.get("answers") or []
    loc = rec.get("loc", "")
    loc = loc[len("nq question: "):] if loc.startswith("nq question: ") else loc
    return EditRequest(
        prompt=template_from_prompt(_need(rec, "src", where), subject, f"{where}: field 'src'"),
        subject=subject,
        target_new=_need(rec, "alt", where),
        target_true=answers[0] if answers and isinstance(answers[0], str) else None,
        case_id=rec.get("case_id"),
        paraphrase_prompts=_str_list(rec, "rephrase", where),
        neighborhood_prompts=[loc] if loc else [],
        neighborhood_answers=[rec["loc_ans"]] if loc and isinstance(rec.get("loc_ans"), str) else [],
    )


def _from_own(rec: Mapping[str, Any], where: str) -> EditRequest:
    return EditRequest.coerce(dict(rec), where)


CONVERTERS: dict[str, Callable[[Mapping[str, Any], str], EditRequest]] = {
    "counterfact": _from_counterfact,
    "easyedit": _from_easyedit,
    "zsre": _from_zsre,
    "lit_prune": _from_own,
}


def records_to_requests(
    records: list[Mapping[str, Any]],
    fmt: str | None = None,
    source: str = "data",
    indices: list[int] | None = None,
    lines: list[int] | None = None,
    skipped: list[tuple[int, str]] | None = None,
) -> list[EditRequest]:
    """Convert and validate records; errors name ``source``, the record index (``indices[i]`` if given), the line
    of a JSON Lines file (``lines[indices[i]]`` if given) and the field. ``skipped`` given: a record that cannot be
    edited (a missing or empty field, ``target_new`` equal to ``target_true``, ...) is left out and
    ``(index, message)`` appended to it instead of raising."""
    if fmt is not None and fmt not in CONVERTERS:
        raise EditRequestError(f"{source}: unknown data format '{fmt}'; known formats: {', '.join(FORMATS)}")

    def where_of(j: int) -> str:
        i = indices[j] if indices is not None else j
        return f"{source}: record {i}" + (f" (line {lines[i]})" if lines is not None else "")

    if fmt is None and records and isinstance(records[0], Mapping):
        # one format per file: a malformed record is reported, not re-detected
        fmt = detect_format(records[0], where_of(0))
    out = []
    for j, rec in enumerate(records):
        i = indices[j] if indices is not None else j
        where = where_of(j)
        try:
            out.append(_to_request(rec, fmt, i, where))
        except EditRequestError as e:
            if skipped is None:
                raise
            skipped.append((i, str(e)))
    return out


def _to_request(rec: Any, fmt: str | None, i: int, where: str) -> EditRequest:
    if not isinstance(rec, Mapping):
        raise EditRequestError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    req = CONVERTERS[fmt or detect_format(rec, where)](rec, where)
    if req.case_id is None:
        req.case_id = i
    req.validate(where)
    if req.subject not in req.full_prompt:
        raise EditRequestError(f"{where}: subject {req.subject!r} not found in field 'prompt'")
    return req


def read_records_with_lines(path: str | Path) -> tuple[list[Any], list[int] | None]:
    """Records of a ``.json`` (a list, or ``{"data": [...]}``) or ``.jsonl`` file (one record per non-empty line),
    and for JSON Lines the 1-based line number of each record (``None`` for ``.json``)."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise EditRequestError(f"'{p}' is a directory; data.path must name a .json or .jsonl file of edit records")
    if not p.is_file():
        raise EditRequestError(f"edit data file not found: '{p}'")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise EditRequestError(f"'{p}' is not UTF-8 text (byte {e.start}): save it as UTF-8 JSON") from None
    except OSError as e:
        raise EditRequestError(f"cannot read edit data file '{p}': {e.strerror or e}") from None
    if p.suffix == ".jsonl":
        records, lines = [], []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise EditRequestError(f"'{p}': line {n} is not valid JSON: {e.msg} (column {e.colno})") from None
            lines.append(n)
        return records, lines
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise EditRequestError(f"'{p}' is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if isinstance(data, dict) and "data" in data:
        data = data["data"]
    if not isinstance(data, list):
        raise EditRequestError(f"'{p}': expected a JSON list of records, got {type(data).__name__}")
    return data, None


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Records of a ``.json`` (a list) or ``.jsonl`` file."""
    return read_records_with_lines(path)[0]


def demo_path() -> Path:
    """The bundled hand-written demo edit set (this project's format)."""
    return Path(__file__).with_name("demo_edits.json")


def load_requests(path: str | Path | None = None, fmt: str | None = None, n: int | None = None) -> list[EditRequest]:
    """Requests from a local file (``None`` or ``"demo"``: the bundled demo set), the first ``n`` if given."""
    p = demo_path() if path in (None, "demo") else Path(path)
    records, lines = read_records_with_lines(p)
    if n is not None:
        if n > len(records):
            raise EditRequestError(f"n_edits={n} but '{p}' has only {len(records)} records")
        records = records[:n]
    return records_to_requests(records, fmt, source=str(p), lines=lines)
