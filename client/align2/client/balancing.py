"""How a client spreads its calls over several replicas: gRPC's own name resolution, load
balancing and client-side health checking; no balancer of ours.

A target that names several replicas is balanced ``round_robin`` (each call goes to the next
ready replica): an ``ipv4:``/``ipv6:`` list, a comma-separated list of IP addresses, or a
``dns:`` name, which resolves to every address of the name (a Kubernetes headless Service).
With health checking, every connection watches its replica's ``align2.v1.CurationService``
health (grpc.health.v1 ``Watch``) and a replica that is not SERVING (warming up, draining,
failed) gets no calls until it is again.

grpcio facts this relies on (grpcio 1.85): client-side health checking is switched on by
``healthCheckConfig`` in the service config alone; the only channel argument about it is
``grpc.inhibit_health_checking``, which turns it off. ``pick_first`` ignores it (gRPC's
proposal A17); ``round_robin`` honours it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

from align2.client.health import SERVICE

ROUND_ROBIN = "round_robin"
PICK_FIRST = "pick_first"
POLICIES = (ROUND_ROBIN, PICK_FIRST)
_LISTS = ("ipv4:", "ipv6:")


def target_string(target: str | Sequence[str]) -> str:
    """The gRPC target for ``target``: a target string as given, or for several addresses
    (a sequence, or one string of comma-separated ``IP:PORT``) gRPC's ``ipv4:``/``ipv6:``
    list. ValueError for an empty target, or a list with a host name or both families."""
    parts = [target] if isinstance(target, str) else list(target)
    addresses = [a.strip() for part in parts for a in part.split(",") if a.strip()]
    if not addresses:
        raise ValueError("target: no address given")
    if len(parts) == 1 and ("," not in parts[0] or parts[0].startswith(_LISTS)):
        return parts[0].strip()
    families = {_family(address) for address in addresses}
    if len(families) > 1:
        raise ValueError(
            f"target: {', '.join(addresses)} mixes IPv4 and IPv6 addresses; gRPC lists one "
            "family per target"
        )
    [family] = families
    return f"{family}:{','.join(addresses)}"


def lb_policy(target: str, load_balancing: str | None) -> str | None:
    """The load-balancing policy of a channel to ``target``: ``load_balancing`` when given,
    else ``round_robin`` for a target naming several replicas (see the module doc), else None
    (gRPC's default, ``pick_first``)."""
    if load_balancing is not None:
        if load_balancing not in POLICIES:
            raise ValueError(
                f"load_balancing: {load_balancing!r} is not one of {', '.join(POLICIES)}"
            )
        return load_balancing
    several = target.startswith("dns:") or (target.startswith(_LISTS) and "," in target)
    return ROUND_ROBIN if several else None


def balancing_config(policy: str | None, *, health_check: bool) -> dict[str, Any]:
    """The service-config keys for ``policy`` (nothing for gRPC's default): the policy, and
    with ``round_robin`` and ``health_check`` the health-checked service."""
    if policy is None:
        return {}
    config: dict[str, Any] = {"loadBalancingConfig": [{policy: {}}]}
    if policy == ROUND_ROBIN and health_check:
        config["healthCheckConfig"] = {"serviceName": SERVICE}
    return config


def _family(address: str) -> str:
    """ "ipv4" or "ipv6" for ``IP:PORT`` (``[IPv6]:PORT``); ValueError naming the address."""
    host, _, port = address.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    try:
        ip = ipaddress.ip_address(host[1:-1] if bracketed else host)
    except ValueError:
        ip = None
    if ip is None or not port.isdigit() or (ip.version == 6) != bracketed:
        raise ValueError(
            f"target: {address!r} is not IP:PORT ([IPv6]:PORT); a list of replicas takes IP "
            "addresses (gRPC's ipv4:/ipv6: targets); for every address of a name use "
            "dns:///NAME:PORT"
        )
    return f"ipv{ip.version}"
