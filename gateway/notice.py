"""The privacy notice mapped onto the policy (config/notice-map.yaml).

Each section of the notice names the policy entries that enforce it
(`features.X`, `streams.X`, `commands.X`, `messages.X`) or the control-plane
routes that answer it (`api.PATH`); a section the gateway cannot enforce says
why (`outside`); `differs` records where the default policy deliberately does
something else. `check` refuses a map whose references do not exist, so the map
cannot drift from the policy and the API unnoticed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gateway.about import PACKAGED_DEFAULTS
from gateway.policy import CompiledPolicy

# config/notice-map.yaml is the copy to edit; the package ships this one.
DEFAULT_NOTICE_MAP = PACKAGED_DEFAULTS / "notice-map.yaml"


@dataclass(frozen=True, slots=True)
class NoticeSection:
    id: str
    lines: str
    title: str
    policy: tuple[str, ...]
    notice_basis: str = ""
    differs: str = ""
    outside: str = ""


def load_notice_map(path: Path = DEFAULT_NOTICE_MAP) -> list[NoticeSection]:
    document: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    return [
        NoticeSection(
            id=str(s["id"]),
            lines=str(s["lines"]),
            title=str(s["title"]),
            policy=tuple(str(p) for p in s.get("policy") or ()),
            notice_basis=str(s.get("notice_basis", "")),
            differs=str(s.get("differs", "")),
            outside=str(s.get("outside", "")),
        )
        for s in document["sections"]
    ]


def check(sections: list[NoticeSection], policy: CompiledPolicy, api_paths: set[str]) -> list[str]:
    """Problems: references to entries that do not exist, sections that name
    nothing without saying why, duplicate ids."""
    doc = policy.document
    known = {
        "features": set(doc.features),
        "streams": set(doc.streams),
        "commands": set(doc.commands),
        "messages": set(doc.messages),
        "recipients": set(doc.recipients),
        "api": api_paths,
    }
    problems = []
    seen: set[str] = set()
    for section in sections:
        if section.id in seen:
            problems.append(f"{section.id}: listed twice")
        seen.add(section.id)
        if not section.policy and not section.outside:
            problems.append(f"{section.id}: names no policy entry and says not why (`outside`)")
        for ref in section.policy:
            kind, _, name = ref.partition(".")
            if name not in known.get(kind, set()):
                problems.append(f"{section.id}: {ref} does not exist")
    return problems
