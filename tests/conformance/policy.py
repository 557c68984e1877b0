"""The release rules the policy tests expect (PROTOCOL.md §6.4), for a worker holding data.OWN.

``python -m tests.conformance.policy DIR`` writes DIR/policy.toml for the reference worker
(``plan-worker --data DIR/own.npz:conformance --policy DIR/policy.toml``); a worker in another language
sets up the same rules its own way.
"""

from __future__ import annotations

import sys
from pathlib import Path

from . import plans

IDENTITY = plans.plan_id(plans.LEAKS["identity"][0])
SLICE = plans.plan_id(plans.LEAKS["slice"][0])
SCALED = plans.plan_id(plans.scaled())
ACCUMULATE = plans.plan_id(plans.accumulate())

TEXT = f"""
[[plan]]
fingerprint = "{IDENTITY}"
name = "identity, approved as it is"
min_batch = 2
outputs.y = "as_is"

[[plan]]
fingerprint = "{SLICE}"
name = "slice, approved from 3 rows"
min_batch = 3
outputs.y = "as_is"

[[plan]]
fingerprint = "{SCALED}"
name = "scaled by s in [0, 1]"
outputs.y = "as_is"
inputs.s = {{ min = 0.0, max = 1.0 }}

[[plan]]
fingerprint = "{ACCUMULATE}"
name = "accumulate, released as an update"
outputs.new_w = {{ update = "w" }}
"""


def write(directory: Path) -> Path:
    path = Path(directory) / "policy.toml"
    path.write_text(TEXT)
    return path


if __name__ == "__main__":
    print(write(Path(sys.argv[1] if len(sys.argv) > 1 else ".")))
