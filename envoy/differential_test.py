#!/usr/bin/env python3
"""`tenantgate check` against real Envoy on one table of raw requests
(testdata/differential.json, the table host-tests `differential` runs against
the filter in wasmtime). For every row Envoy's status must be the row's and
`check`'s; when tenantgate answered, the policy ids of a 403 must match; when
the request was forwarded, the `x-tenantgate-*` headers and the path the
upstream received must be the ones `check` predicts.

    python3 envoy/differential_test.py [-v]

Standard library only; every request on a fresh connection, byte for byte.
"""

import json
import subprocess
import sys
import unittest
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness as h  # noqa: E402
import e2e_test as e2e  # noqa: E402
from isolation_test import answered_by, raw_request  # noqa: E402

TABLE = h.REPO / "testdata" / "differential.json"


def check(row):
    cmd = h.cli_command() + ["check", str(h.POLICIES), "--method", row["method"], "--path", row["path"]]
    for k, v in row["headers"]:
        cmd += ["--header", f"{k}={v}"]
    out = subprocess.run(cmd, cwd=h.REPO, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"check failed for {row['id']}: {out.stderr}")
    return json.loads(out.stdout)


class Differential(e2e.EnvoyCase):
    bundle_name = "main"

    def test_check_agrees_with_envoy_on_every_row(self):
        rows = json.loads(TABLE.read_text())["rows"]
        by = {}
        for row in rows:
            with self.subTest(row["id"]):
                predicted = check(row)
                resp = raw_request(self.envoy.listen_port, row["method"], row["path"], row["headers"])
                who = answered_by(resp)
                by[who] = by.get(who, 0) + 1
                self.assertEqual(resp.status, row["status"], resp)
                self.assertEqual(predicted["status"], row["status"], predicted)
                if who == "tenantgate" and resp.status == 403:
                    self.assertEqual(sorted(resp.json().get("reasons") or []), sorted(predicted["reasons"]))
                if who == "upstream":
                    doc = resp.json()
                    own = {k: v for k, v in doc["headers"].items()
                           if k.replace("_", "-").startswith("x-tenantgate-")}
                    self.assertEqual(own, predicted["upstream"]["headers"])
                    want_path = predicted["upstream"]["path"] or row["path"]
                    self.assertEqual(doc["path"], want_path)
        print(f"\n  differential: {len(rows)} rows, answered by {by}", file=sys.stderr)


if __name__ == "__main__":
    result = unittest.main(exit=False, verbosity=2 if "-v" in sys.argv else 1).result
    failed = len(result.failures) + len(result.errors)
    print(f"envoy-differential: {result.testsRun - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
