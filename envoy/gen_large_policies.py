#!/usr/bin/env python3
"""Writes a large policy tree for the benchmark's configuration (e):
1,000 tenants, 10,000 policies, `rps` limits on 3 levels.

    python3 envoy/gen_large_policies.py OUT_DIR [--orgs 10 --units 9 --teams 10 --per-tenant 10]

Shape (defaults): `/` -> 10 orgs `/oNN` -> 9 units each `/oNN/uN` -> 10 teams
each `/oNN/uN/tN`: 10 + 90 + 900 = 1,000 tenants below the root. Every tenant
gets 10 policies (permits and forbids with conditions on the principal, the
action, the path, headers and tenant attributes), so 10,000 policies in all,
plus the root's isolation guardrail. Limits: `rps` on the root, every org
(10%, ceil 100%) and every unit (10%, ceil 100%), so a request to a team pays
on 3 levels, like a request to /acme/eu in policies/ does.

Limits are large (the root admits 100 million per second): the benchmark
measures admitted requests, not 429s. Settings are those of
policies/tenantgate.json except `audit: "deny"` (a benchmark of admitted
requests then writes no audit line). The schema is policies/schema.cedarschema, so every
policy is validated in strict mode.

The benchmark request: GET /api/v1/items/42 to /o07/u4/t3 by `dev-o07-u4-t3`
(home /o07/u4/t3), allowed by that team's `read-o07-u4-t3` permit.
"""

import argparse
import json
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROOT_RATE = 100_000_000

# Settings as in policies/ (identity from headers, RateLimit fields on allowed
# responses, x-api-key in the context, POST costs 2), except that only denials
# are audited.
SETTINGS = dict(json.loads((REPO / "policies" / "tenantgate.json").read_text()), audit="deny")

ROOT_POLICIES = """// Root guardrails of the generated tree.
@id("isolation")
forbid (principal, action, resource)
unless { resource in principal.tenant };

@id("internal-paths")
forbid (principal, action, resource)
when { resource.path == "/internal" || resource.path like "/internal/*" };

@id("healthz")
permit (principal, action in [Action::"GET", Action::"HEAD"], resource)
when { resource.path == "/healthz" };
"""


def tenant_policies(path, slug, index):
    """Ten policies attached to tenant `path` (ids unique through `slug`)."""
    t = f'Tenant::"{path}"'
    return f"""// Generated policies of {path}.
@id("read-{slug}")
permit (principal in {t}, action in Action::"read", resource in {t});

@id("write-{slug}")
permit (principal in {t}, action in Action::"write", resource in {t})
when {{ resource.tenant == principal.tenant }}
when {{ context.headers has "x-api-key" && context.headers["x-api-key"] != "" }};

@id("blocklist-{slug}")
forbid (principal, action, resource)
when {{ [User::"banned-{slug}-a", User::"banned-{slug}-b"].contains(principal) }};

@id("frozen-path-{slug}")
forbid (principal, action in Action::"write", resource)
when {{ resource.path like "/frozen-{index}/*" }};

@id("night-writes-{slug}")
forbid (principal, action in Action::"write", resource)
when {{ context.time.hour_utc < 6 }}
unless {{ resource.tenant has tier && resource.tenant.tier == "gold" }};

@id("reports-{slug}")
permit (principal, action == Action::"GET", resource in {t})
when {{ resource.path like "/reports/{index}/*" }}
when {{ principal.tenant has tier && principal.tenant.tier == "gold" }};

@id("delete-needs-key-{slug}")
forbid (principal, action == Action::"DELETE", resource)
unless {{ context.headers has "x-api-key" }};

@id("ops-{slug}")
permit (principal, action in Action::"read", resource in {t})
when {{ principal.tenant has support && principal.tenant.support }};

@id("public-{slug}")
permit (principal, action == Action::"GET", resource in {t})
when {{ resource.tenant has public && resource.tenant.public && resource.path like "/docs/*" }};

@id("region-{slug}")
forbid (principal, action, resource in {t})
when {{ resource.path like "/eu-only/*" }}
unless {{ principal.tenant has region && principal.tenant.region == "eu" }};
"""


def write_tenant(folder, attributes, limits, path, slug, index, per_tenant):
    folder.mkdir(parents=True, exist_ok=True)
    config = {"attributes": attributes}
    if limits:
        config["limits"] = limits
    (folder / "tenant.json").write_text(json.dumps(config, indent=2) + "\n")
    text = tenant_policies(path, slug, index)
    if per_tenant != 10:  # keep exactly `per_tenant` policies
        blocks = text.split("\n\n")
        text = "\n\n".join(blocks[: per_tenant])
    (folder / "policies.cedar").write_text(text)
    return per_tenant


def generate(out, orgs=10, units=9, teams=10, per_tenant=10):
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    root = out / "tenants"
    root.mkdir(parents=True)
    (out / "tenantgate.json").write_text(json.dumps(SETTINGS, indent=2) + "\n")
    shutil.copy(REPO / "policies" / "schema.cedarschema", out / "schema.cedarschema")
    (root / "tenant.json").write_text(json.dumps({
        "attributes": {"tier": "platform"},
        "limits": {"rps": {"rate": ROOT_RATE, "per": "1s", "burst": ROOT_RATE}},
    }, indent=2) + "\n")
    (root / "root.cedar").write_text(ROOT_POLICIES)
    share = {"rps": {"rate": "10%", "ceil": "100%"}}
    tiers = ["gold", "silver", "bronze"]
    regions = ["eu", "us"]
    tenants = policies = 0
    n = 0
    for o in range(orgs):
        org = f"o{o:02d}"
        policies += write_tenant(root / org, {"tier": tiers[o % 3], "region": regions[o % 2]}, share,
                                 f"/{org}", org, n, per_tenant)
        tenants += 1
        n += 1
        for u in range(units):
            unit = f"u{u}"
            policies += write_tenant(root / org / unit, {"tier": tiers[(o + u) % 3], "region": regions[(o + u) % 2]},
                                     share, f"/{org}/{unit}", f"{org}-{unit}", n, per_tenant)
            tenants += 1
            n += 1
            for t in range(teams):
                team = f"t{t}"
                attrs = {"region": regions[(o + u + t) % 2]}
                if t % 4 == 0:
                    attrs["tier"] = "gold"
                policies += write_tenant(root / org / unit / team, attrs, None, f"/{org}/{unit}/{team}",
                                         f"{org}-{unit}-{team}", n, per_tenant)
                tenants += 1
                n += 1
    return tenants, policies


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--orgs", type=int, default=10)
    parser.add_argument("--units", type=int, default=9)
    parser.add_argument("--teams", type=int, default=10)
    parser.add_argument("--per-tenant", type=int, default=10, choices=range(1, 11))
    args = parser.parse_args()
    tenants, policies = generate(args.out, args.orgs, args.units, args.teams, args.per_tenant)
    print(f"{args.out}: {tenants} tenants below the root, {policies} policies (+3 at the root)")


if __name__ == "__main__":
    main()
