"""The command line and environment of a pod's process, built as the kubelet builds a
container's: pure functions, no I/O (ConfigMaps and Secrets come in through `Sources`).

Order and precedence follow the kubelet (`kubecontainer.MakeEnvironmentVariables`):
`envFrom` sources first, then `env` entries in order, a later entry replacing an earlier one.
A plain `value` may refer to variables defined before it as `$(NAME)`; `$$(NAME)` is the
literal text `$(NAME)`, and a reference to an undefined variable stays as written. The same
expansion applies to `command` and `args`, against the container's whole environment.

On top of the pod's own variables, the process inherits a few of the executor's own (PATH,
HOME, LANG, LC_*, TZ, TMPDIR, USER, LOGNAME, TERM, PYTHON*) so that `python`, `sh` and the
`tasklease` command work, with the executor's interpreter's directory first on PATH. Nothing
else leaks in: no KUBECONFIG of the executor's own (the executor gives each pod one of its
own) and no proxy settings (an HTTPS_PROXY meant for the internet would capture the
process's calls to the API server on loopback).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

logger = logging.getLogger(__name__)

LOCAL_IP: Final = "127.0.0.1"
INHERITED_NAMES: Final = frozenset(
    {"PATH", "HOME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "USER", "LOGNAME", "TERM"}
)
INHERITED_PREFIXES: Final = ("LC_", "PYTHON")
# Keys of a ConfigMap or Secret that `envFrom` turns into variables: the kubelet skips keys
# that are not C identifiers (and records an event); so do we (with a warning).
_ENV_NAME: Final = re.compile(r"[-._a-zA-Z][-._a-zA-Z0-9]*")
_LABEL_REF: Final = re.compile(r"metadata\.(labels|annotations)\['([^']*)'\]")


class EnvError(Exception):
    """The container's environment cannot be built: the kubelet's CreateContainerConfigError
    (a missing ConfigMap, Secret or key that is not optional, an unsupported field path)."""


@dataclass(frozen=True, slots=True)
class Sources:
    """Lookups of the objects an environment may refer to, by name in the pod's namespace.

    Each returns the object's data as text (a Secret's values already decoded), or None
    when the object does not exist.
    """

    config_map: Callable[[str], Mapping[str, str] | None]
    secret: Callable[[str], Mapping[str, str] | None]


def expand(text: str, lookup: Callable[[str], str | None]) -> str:
    """Kubernetes' `$(NAME)` expansion (k8s.io/kubernetes third_party/forked/golang/expansion).

    `$(NAME)` becomes the variable's value when `lookup` knows it and stays as written when
    not; `$$` is one literal `$`; a `$` not starting either form is kept.
    """
    out: list[str] = []
    checkpoint = 0
    cursor = 0
    while cursor < len(text):
        if text[cursor] == "$" and cursor + 1 < len(text):
            out.append(text[checkpoint:cursor])
            following = text[cursor + 1]
            advance = 1
            if following == "$":
                out.append("$")
            elif following == "(":
                closer = text.find(")", cursor + 2)
                if closer == -1:
                    out.append("$(")
                else:
                    name = text[cursor + 2 : closer]
                    value = lookup(name)
                    out.append(value if value is not None else f"$({name})")
                    advance = closer - cursor
            else:
                out.append("$" + following)
            cursor += advance
            checkpoint = cursor + 1
        cursor += 1
    out.append(text[checkpoint:])
    return "".join(out)


def field_value(pod: Mapping[str, Any], path: str, *, pod_ip: str = LOCAL_IP) -> str:
    """The value of a downward-API `fieldRef` for an environment variable."""
    metadata = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    simple: dict[str, str | None] = {
        "metadata.name": metadata.get("name"),
        "metadata.namespace": metadata.get("namespace"),
        "metadata.uid": metadata.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        # Every pod of this executor shares the host's network: pod IP = host IP = loopback.
        "status.podIP": pod_ip,
        "status.podIPs": pod_ip,
        "status.hostIP": pod_ip,
        "status.hostIPs": pod_ip,
    }
    if path in simple:
        return simple[path] or ""
    match = _LABEL_REF.fullmatch(path)
    if match:
        values = metadata.get(match.group(1)) or {}
        return str(values.get(match.group(2), ""))
    raise EnvError(f"unsupported fieldRef fieldPath {path!r}")


def _key_ref(
    kind: str,
    ref: Mapping[str, Any],
    lookup: Callable[[str], Mapping[str, str] | None],
    namespace: str,
) -> str | None:
    name = str(ref.get("name", ""))
    key = str(ref.get("key", ""))
    optional = bool(ref.get("optional", False))
    data = lookup(name)
    if data is None:
        if optional:
            return None
        raise EnvError(f'{kind} "{name}" not found in namespace {namespace}')
    if key not in data:
        if optional:
            return None
        raise EnvError(f"couldn't find key {key} in {kind} {namespace}/{name}")
    return data[key]


def container_env(
    pod: Mapping[str, Any],
    container: Mapping[str, Any],
    *,
    sources: Sources,
    pod_ip: str = LOCAL_IP,
) -> dict[str, str]:
    """The variables the container's spec defines (`envFrom`, then `env`), resolved."""
    namespace = str((pod.get("metadata") or {}).get("namespace", ""))
    env: dict[str, str] = {}

    for source in container.get("envFrom") or []:
        prefix = str(source.get("prefix") or "")
        if "configMapRef" in source:
            kind, ref, lookup = "ConfigMap", source["configMapRef"], sources.config_map
        elif "secretRef" in source:
            kind, ref, lookup = "Secret", source["secretRef"], sources.secret
        else:
            logger.warning("ignoring an envFrom source of an unknown kind: %s", source)
            continue
        data = lookup(str(ref.get("name", "")))
        if data is None:
            if ref.get("optional"):
                continue
            raise EnvError(f'{kind} "{ref.get("name")}" not found in namespace {namespace}')
        for key, value in data.items():
            name = prefix + key
            if _ENV_NAME.fullmatch(name):
                env[name] = value
            else:
                logger.warning("skipping key %r of %s %r: not a valid name", key, kind, ref)

    for entry in container.get("env") or []:
        name = str(entry["name"])
        value_from = entry.get("valueFrom")
        if value_from is None:
            env[name] = expand(str(entry.get("value") or ""), env.get)
        elif "fieldRef" in value_from:
            env[name] = field_value(pod, str(value_from["fieldRef"]["fieldPath"]), pod_ip=pod_ip)
        elif "configMapKeyRef" in value_from:
            found = _key_ref(
                "ConfigMap", value_from["configMapKeyRef"], sources.config_map, namespace
            )
            if found is not None:
                env[name] = found
        elif "secretKeyRef" in value_from:
            found = _key_ref("Secret", value_from["secretKeyRef"], sources.secret, namespace)
            if found is not None:
                env[name] = found
        else:
            # resourceFieldRef (and anything newer): would need quantity arithmetic against
            # limits or the node's allocatable; no runner relies on it.
            logger.warning("skipping env %s: unsupported valueFrom %s", name, sorted(value_from))
    return env


def command_line(container: Mapping[str, Any], env: Mapping[str, str]) -> list[str]:
    """`command` + `args` with `$(NAME)` expanded against the container's environment.

    There is no image, hence no ENTRYPOINT or CMD to fall back on: a container without a
    `command` cannot be run here.
    """
    command = [str(part) for part in container.get("command") or []]
    if not command:
        raise EnvError(
            f"container {container.get('name')!r} has no command; the local executor runs "
            f"`command` + `args` as a process and ignores images, so their entrypoints too"
        )
    args = [str(part) for part in container.get("args") or []]
    return [expand(part, env.get) for part in command + args]


def inherited_env(environ: Mapping[str, str], *, interpreter_dir: str) -> dict[str, str]:
    """The part of the executor's own environment a pod's process gets, with
    `interpreter_dir` (the executor's virtualenv's `bin`) first on PATH."""
    inherited = {
        name: value
        for name, value in environ.items()
        if name in INHERITED_NAMES or name.startswith(INHERITED_PREFIXES)
    }
    path = [entry for entry in environ.get("PATH", os.defpath).split(os.pathsep) if entry]
    inherited["PATH"] = os.pathsep.join(
        [interpreter_dir, *(entry for entry in path if entry != interpreter_dir)]
    )
    return inherited


def process_env(
    *,
    inherited: Mapping[str, str],
    pod_name: str,
    container: Mapping[str, str],
    executor: Mapping[str, str],
) -> dict[str, str]:
    """The final environment: inherited < HOSTNAME < the container's < the executor's own
    (KUBECONFIG and the marker that finds the process again), later ones winning."""
    return {**inherited, "HOSTNAME": pod_name, **container, **executor}
