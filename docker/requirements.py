"""Print the package's requirements from pyproject.toml, one a line, for pip install -r in the image builds.

The images install the dependencies in layers of their own (they change less often than the code), and the node
and export image leaves out the machine-learning stack, which only an inference worker imports:

    python3 docker/requirements.py pyproject.toml --without torch,transformers --extras postgresql
    python3 docker/requirements.py pyproject.toml --only transformers,tokenizers
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib


def _name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert match is not None, requirement
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("pyproject")
    parser.add_argument("--without", default="", help="comma-separated distribution names to leave out")
    parser.add_argument("--only", default="", help="comma-separated distribution names to keep (and no others)")
    parser.add_argument("--extras", default="", help="comma-separated optional-dependency groups to add")
    args = parser.parse_args()
    with open(args.pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    wanted = list(project["dependencies"])
    for extra in filter(None, args.extras.split(",")):
        wanted += project["optional-dependencies"][extra]
    without = {_name(n) for n in args.without.split(",") if n}
    only = {_name(n) for n in args.only.split(",") if n}
    for requirement in wanted:
        name = _name(requirement)
        if name in without or (only and name not in only):
            continue
        print(requirement)
    return 0


if __name__ == "__main__":
    sys.exit(main())
