"""Per-sample teacher routing in the config (`students.<name>.route`; the routing itself: kd_core/teachers/routing.py): each
training row is distilled from the teacher of its domain, the value of a data field.

    route: {field: category, domains: {arithmetic: math_teacher, open_qa: teacher}, default: teacher}

The routed teachers (the domains' and the default) become the student's `teachers` (each weight 1: every row
has one teacher, nothing is combined), so the chain rules, the DVC dependencies and the per-teacher caches of
several teachers apply unchanged; `teachers` itself must then be left out.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from kd_core.config.base import StrictModel


class RouteConfig(StrictModel):
    """Which teacher distills which rows: by the value of `field` in each row."""

    field: Literal["category"] = Field("category", description="the row's field naming its domain (map a source "
                                                                 "column to it with data.field_map)")
    domains: dict[str, str] = Field(..., min_length=1, description="domain -> teacher model")
    default: str | None = Field(None, description="teacher of the rows of other domains (null: such a row is an "
                                                  "error)")

    def teachers(self) -> list[str]:
        """The routed teachers, each once, in the order they are first named (domains, then the default)."""
        names = [*self.domains.values(), *([self.default] if self.default else [])]
        return list(dict.fromkeys(names))


def with_route_teachers(data: Any) -> Any:
    """A raw student with a `route` and no `teachers`: its `teachers` set to the routed ones (weight 1 each)."""
    if not isinstance(data, dict) or not isinstance(data.get("route"), dict):
        return data
    if data.get("teachers") is not None:
        raise ValueError("teachers: set by route (its domains' teachers and its default); leave teachers out")
    route = data["route"]
    domains = route.get("domains") if isinstance(route.get("domains"), dict) else {}
    names = [t for t in [*domains.values(), route.get("default")] if isinstance(t, str)]
    return {**data, "teachers": {name: 1.0 for name in dict.fromkeys(names)}} if names else data


def check_routes(cfg) -> None:
    """Each route names models the student may be taught by (before the teachers' own rules, which then apply to
    the routed teachers), and its method reads the teacher's signal on its own batches (kd, atkd: a row's domain
    is found by its content; on-policy methods score batches they generate)."""
    from kd_core.config.methods import METHOD_SPECS

    models = [cfg.teacher.name, *cfg.students]
    for name, st in cfg.students.items():
        if st.route is None:
            continue
        allowed = ", ".join(m for m in models if m != name)
        for key, teacher in [*((f"domains.{d}", t) for d, t in st.route.domains.items()), ("default", st.route.default)]:
            if teacher is not None and (teacher not in models or teacher == name):
                raise ValueError(f"students.{name}.route.{key}: unknown model {teacher!r} (allowed: {allowed})")
        if not METHOD_SPECS[st.method].reads_teacher_cache:
            readers = ", ".join(sorted(n for n, m in METHOD_SPECS.items() if m.reads_teacher_cache))
            raise ValueError(f"students.{name}.route: method {st.method!r} scores batches it builds itself; routing "
                             f"by a data field is for: {readers}")
