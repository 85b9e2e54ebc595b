"""Edit requests: what one counterfactual edit asks for, plus the prompts used to score it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from .errors import LitPruneError


class EditRequestError(LitPruneError):
    """A malformed edit request; the message names the record and the field (a ``ValueError``)."""


@dataclass
class EditRequest:
    """One edit: make ``prompt.format(subject)`` continue with ``target_new`` instead of ``target_true``.

    ``prompt`` contains exactly one ``{}`` where the subject goes. Targets are stored without a leading space;
    scoring and editing prepend one (``" " + target``) as ROME does.
    ``paraphrase_prompts`` / ``neighborhood_prompts`` are complete prompts (subject already filled in).
    ``neighborhood_answers`` optionally gives one expected answer per neighbourhood prompt (ZsRE/EasyEdit locality);
    when empty, locality compares ``target_true`` against ``target_new`` on each neighbourhood prompt (CounterFact).
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    case_id: int | str | None = None
    paraphrase_prompts: list[str] = field(default_factory=list)
    neighborhood_prompts: list[str] = field(default_factory=list)
    neighborhood_answers: list[str] = field(default_factory=list)

    @property
    def full_prompt(self) -> str:
        """The edit prompt with the subject filled in."""
        return self.prompt.format(self.subject)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def coerce(cls, obj: "EditRequest | Mapping[str, Any]", where: str = "request") -> "EditRequest":
        """Build (and validate) a request from a dict or return a validated copy-free request."""
        if isinstance(obj, EditRequest):
            obj.validate(where)
            return obj
        if not isinstance(obj, Mapping):
            raise EditRequestError(f"{where}: expected a dict or EditRequest, got {type(obj).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = set(obj) - known
        if unknown:
            raise EditRequestError(f"{where}: unknown field(s) {sorted(unknown)}; known fields: {sorted(known)}")
        for f in ("prompt", "subject", "target_new"):
            if f not in obj:
                raise EditRequestError(f"{where}: missing field '{f}'")
        req = cls(**dict(obj))
        req.validate(where)
        return req

    def validate(self, where: str = "request") -> None:
        """Raise :class:`EditRequestError` naming ``where`` and the field if this request cannot be edited."""
        cid = f" (case_id {self.case_id})" if self.case_id is not None else ""
        w = f"{where}{cid}"
        for f in ("prompt", "subject", "target_new"):
            v = getattr(self, f)
            if not isinstance(v, str):
                raise EditRequestError(f"{w}: field '{f}' must be a string, got {type(v).__name__}")
            if not v.strip():
                raise EditRequestError(f"{w}: field '{f}' is empty")
        if self.target_true is not None and not isinstance(self.target_true, str):
            raise EditRequestError(f"{w}: field 'target_true' must be a string, got {type(self.target_true).__name__}")
        if self.target_true is not None and self.target_new.strip() == self.target_true.strip():
            raise EditRequestError(
                f"{w}: field 'target_new' equals 'target_true' ({self.target_new.strip()!r}): there is nothing to "
                "edit; change target_new or remove the record"
            )
        if self.prompt.count("{}") != 1:
            raise EditRequestError(
                f"{w}: field 'prompt' must contain exactly one '{{}}' where the subject goes, got {self.prompt!r}"
            )
        for f in ("paraphrase_prompts", "neighborhood_prompts", "neighborhood_answers"):
            v = getattr(self, f)
            if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
                raise EditRequestError(f"{w}: field '{f}' must be a list of strings")
        if self.neighborhood_answers and len(self.neighborhood_answers) != len(self.neighborhood_prompts):
            raise EditRequestError(
                f"{w}: 'neighborhood_answers' has {len(self.neighborhood_answers)} entries for "
                f"{len(self.neighborhood_prompts)} 'neighborhood_prompts'"
            )


def template_from_prompt(prompt: str, subject: str, where: str = "record") -> str:
    """Turn a complete prompt into a template by replacing the (last) occurrence of ``subject`` with ``{}``.

    Braces already in the text are escaped so ``template.format(subject) == prompt``.
    """
    if not subject or subject not in prompt:
        raise EditRequestError(f"{where}: subject {subject!r} not found in prompt {prompt!r}")
    i = prompt.rfind(subject)
    esc = lambda s: s.replace("{", "{{").replace("}", "}}")  # noqa: E731
    return esc(prompt[:i]) + "{}" + esc(prompt[i + len(subject):])
