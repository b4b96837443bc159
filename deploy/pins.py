"""Print pins from pyproject.toml, the one place they live, for the Dockerfile and `make bento`.

    python3 deploy/pins.py [--pyproject FILE] dep NAME      the dependency's requirement: torch==2.13.0
    python3 deploy/pins.py [--pyproject FILE] version NAME  its version: 2.13.0
    python3 deploy/pins.py [--pyproject FILE] extra NAME    an optional group's requirements, space-separated
    python3 deploy/pins.py [--pyproject FILE] dependencies  every dependency, one a line (a requirements.txt)
    python3 deploy/pins.py [--pyproject FILE] serving       the same and the serving extras' requirements
    python3 deploy/pins.py [--pyproject FILE] serving-extras
        the optional groups a server needs, comma-separated: all but the test tools (dev, oip-client) and
        the data packages (data), which go in with --no-deps

Standard library only: it runs on the image's bare Python before anything is installed.
"""

from __future__ import annotations

import sys
import tomllib

NOT_SERVING = ("dev", "data", "oip-client")


def _name(requirement: str) -> str:
    for sep in ("[", "=", "<", ">", "~", "!", ";", " "):
        requirement = requirement.split(sep, 1)[0]
    return requirement.strip().lower()


def main(argv: list[str]) -> int:
    path = "pyproject.toml"
    if argv[:1] == ["--pyproject"]:
        path, argv = argv[1], argv[2:]
    with open(path, "rb") as fh:
        project = tomllib.load(fh)["project"]
    deps = project["dependencies"]
    extras = project.get("optional-dependencies", {})
    what, *rest = argv or ["?"]
    if what in ("dep", "version") and rest:
        found = [r for r in deps if _name(r) == rest[0].lower()]
        if not found:
            print(f"pins: {rest[0]} is not a dependency in {path}", file=sys.stderr)
            return 1
        print(found[0] if what == "dep" else found[0].split("==", 1)[1])
    elif what == "extra" and rest:
        if rest[0] not in extras:
            print(f"pins: {path} has no optional group {rest[0]!r}", file=sys.stderr)
            return 1
        print(" ".join(extras[rest[0]]))
    elif what == "dependencies":
        print("\n".join(deps))
    elif what == "serving":
        print("\n".join(deps + [r for k in extras if k not in NOT_SERVING for r in extras[k]]))
    elif what == "serving-extras":
        print(",".join(k for k in extras if k not in NOT_SERVING))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
