"""The Helm chart's side of the configuration (helm/monogoto-broker).

The chart's `config:` value is the broker's configuration in its own keys (docs/configuration.md)
without the secrets; the chart adds the `*_file` path of every secret in the Secret it mounts.
This module holds both ends of that mapping:

- `config_schema` / `values_schema`: the `config` part of the chart's `values.schema.json`,
  generated from the config model (`scripts/chart-schema`, i.e.
  `python -m service.helm_values [--check] SCHEMA_FILE`);
- `check_helm_values`: what `monogoto-broker check-config --helm-values FILE` runs. It builds the
  `config.yaml` the chart's ConfigMap would hold (the mapping of the chart's
  `monogoto-broker.config` template), finds what makes the chart refuse to render, and checks
  the result with the broker's own loading (`build_settings`) as a pod would: with the chart's
  `extraEnv` as its `BROKER_*` environment and the Secret's files present. Secrets given in the
  values (`secrets.*`) are checked; those of an existing Secret, which only the cluster holds,
  are taken as present.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from service.config import ENV_PREFIX, ConfigError, Settings, build_settings
from service.config.loading import CONFIG_ENV, _read_yaml
from service.keys import new_api_key, new_encryption_key

#: Where the chart mounts the Secret (templates/_helpers.tpl, "monogoto-broker.secretsDir").
SECRETS_DIR = "/etc/monogoto-broker/secrets"


def _never(_: Mapping[str, Any]) -> bool:
    return False


def _authenticates_otherwise(caller: Mapping[str, Any]) -> bool:
    """Whether a caller's config gives it a way to authenticate other than a key."""
    return bool(caller.get("service_accounts") or caller.get("client_subjects"))


@dataclass(frozen=True)
class ChartSecret:
    """A secret of the config as the chart provides it: `path` of the secret field (`*` for an
    account's or caller's name), its place in the values and its key in the Secret (`{name}`
    filled in), and what a present value looks like when the check cannot see it.

    `optional`: named in the config only when the values give it (never with an existing
    Secret). `needless`: whether an account's or caller's config entry can do without it (a
    caller identified by its ServiceAccount or certificate); such an entry names it only when
    the values give it."""

    path: tuple[str, ...]
    place: str
    key: str
    stand_in: Callable[[], str]
    optional: bool = False
    needless: Callable[[Mapping[str, Any]], bool] = _never

    def holders(self, config: dict[str, Any]) -> list[tuple[str, dict[str, Any], tuple[str, ...]]]:
        """Where in `config` this secret's field can be: for each account or caller (or once),
        its name ('' if none), the mapping that holds the field, and that mapping's location."""
        found: list[tuple[str, dict[str, Any], tuple[str, ...]]] = [("", config, ())]
        for part in self.path[:-1]:
            found = [
                (key if part == "*" else name, child, (*loc, key))
                for name, node, loc in found
                for key, child in (node.items() if part == "*" else [(part, node.get(part))])
                if isinstance(child, dict)
            ]
        return found


CHART_SECRETS = (
    ChartSecret(("redis_url",), "secrets.redisUrl", "redis-url", lambda: "redis://redis:6379/0"),
    ChartSecret(
        ("encryption_keys",), "secrets.encryptionKeys", "encryption-keys", new_encryption_key
    ),
    ChartSecret(
        ("accounts", "*", "password"),
        "secrets.accountPasswords.{name}",
        "account-{name}-password",
        lambda: "taken-as-present",
    ),
    ChartSecret(
        ("callers", "*", "api_key_sha256"),
        "secrets.callerKeyDigests.{name}",
        "caller-{name}-api-key-sha256",
        lambda: new_api_key()[1],
        needless=_authenticates_otherwise,
    ),
    ChartSecret(
        ("audit", "hmac_key"),
        "secrets.auditHmacKey",
        "audit-hmac-key",
        lambda: "taken-as-present",
        optional=True,
    ),
)
#: Settings the chart makes from values of its own (templates/_helpers.tpl): `config:` does not
#: take them (its schema leaves them out), and each is named with the value that sets it.
CHART_OWNED: dict[tuple[str, ...], str] = {
    ("tls",): "tls.enabled",
    ("metrics_port",): "metrics.port",
    ("caller_auth", "kubernetes", "jwks_ca_file"): "kubernetesAuth.enabled",
    ("caller_auth", "kubernetes", "jwks_token_file"): "kubernetesAuth.enabled",
}
#: The `helm test` caller the chart adds (tests.enabled) and where its key digest is mounted.
TEST_CALLER = "helm-test"
TEST_CALLER_DIR = "/etc/monogoto-broker/test-caller"
#: Where the chart mounts the TLS Secret and the broker's own ServiceAccount token with the
#: cluster's CA (templates/_helpers.tpl), and the JWKS it reads by default.
TLS_DIR = "/etc/monogoto-broker/tls"
KUBERNETES_DIR = "/etc/monogoto-broker/kubernetes"
IN_CLUSTER_JWKS_URL = "https://kubernetes.default.svc/openid/v1/jwks"

# The values of the chart's values.yaml this module reads besides `config` (whose defaults are
# the broker's own); tests/integration/test_chart.py holds them equal to values.yaml.
CHART_DEFAULTS: dict[str, Any] = {
    "replicaCount": 2,
    "containerPort": 8080,
    "autoscaling": {"enabled": False},
    "metrics": {"port": 9090},
    "tls": {
        "enabled": False,
        "existingSecret": "",
        "certManager": {"enabled": False, "issuerRef": {"name": ""}},
        "clientCertificates": False,
    },
    "kubernetesAuth": {"enabled": False},
    "tests": {"enabled": True, "account": ""},
    "networkPolicy": {"enabled": False, "callers": []},
    "secrets": {
        "existingSecret": "",
        "redisUrl": "",
        "encryptionKeys": "",
        "accountPasswords": {},
        "callerKeyDigests": {},
        "auditHmacKey": "",
    },
    "extraEnv": [],
}

# --- the schema ---------------------------------------------------------------------------------

# The JSON-schema form of checks the config model makes in validators (service/config/fields.py
# and models.py), which pydantic cannot express by itself; tests/integration/test_chart.py holds
# them against the broker's own checks.
NAME_PATTERN = "^[a-z0-9][a-z0-9_-]{0,62}$"
KEY_PREFIX_PATTERN = r"^[^\s{}]+$"
BASE_URL_PATTERN = r"^https?://[^/?#\s]+[^?#\s]*$"
_VALIDATOR_FORMS: dict[tuple[str, ...], dict[str, Any]] = {
    ("key_prefix",): {"pattern": KEY_PREFIX_PATTERN},
    ("upstream", "base_url"): {"pattern": BASE_URL_PATTERN},
    ("accounts",): {"propertyNames": {"pattern": NAME_PATTERN}},
    ("accounts", "*", "base_url"): {"pattern": BASE_URL_PATTERN},
    ("callers",): {"propertyNames": {"pattern": NAME_PATTERN}},
    ("callers", "*", "client_subjects"): {"minItems": 1},
    ("callers", "*", "accounts"): {
        "minItems": 1,
        "items": {"type": "string", "pattern": r"^(\*|[a-z0-9][a-z0-9_-]{0,62})$"},
    },
}
_SCHEMA_DESCRIPTION = (
    "The broker's configuration in its own keys (docs/configuration.md), without its secrets "
    "(they come from the Secret): generated from the config model by scripts/chart-schema."
)


def config_schema() -> dict[str, Any]:
    """The JSON schema of the chart's `config:`: pydantic's schema of `Settings` with its
    references inlined, secrets and their `*_file` twins left out, no unknown keys allowed, and
    the JSON-schema form of the checks the model makes in validators."""
    source = Settings.model_json_schema()
    definitions: dict[str, Any] = source.pop("$defs", {})
    schema = _adapt(source, definitions, ())
    missing = [".".join(path) for path in _VALIDATOR_FORMS if not _has_path(schema, path)]
    if missing:
        raise RuntimeError(f"no such config fields: {', '.join(missing)}")
    schema.pop("description", None)
    return {"description": _SCHEMA_DESCRIPTION, **schema}


def secret_fields() -> set[tuple[str, ...]]:
    """The config's secrets (SecretStr fields, `*` for any account or caller name): what the
    chart's `config:` does not take, next to their `*_file` twins."""
    source = Settings.model_json_schema()
    definitions = source.get("$defs", {})
    found: set[tuple[str, ...]] = set()

    def walk(node: Mapping[str, Any], path: tuple[str, ...]) -> None:
        node = _resolve(node, definitions)
        properties = node.get("properties", {})
        for name, child in properties.items():
            if _is_secret(name, child, properties):
                if not name.endswith("_file"):
                    found.add((*path, name))
            else:
                walk(child, (*path, name))
        if isinstance(node.get("additionalProperties"), Mapping):
            walk(node["additionalProperties"], (*path, "*"))

    walk(source, ())
    return found


def values_schema(current: Mapping[str, Any]) -> dict[str, Any]:
    """The chart's values schema `current` with its `config` part generated anew."""
    schema = copy.deepcopy(dict(current))
    schema["properties"]["config"] = config_schema()
    return schema


def _resolve(node: Mapping[str, Any], definitions: Mapping[str, Any]) -> dict[str, Any]:
    """`node` with a `$ref` replaced by its definition, and `X | None` by X: the chart leaves an
    unset field out instead of writing null."""
    node = dict(node)
    ref = node.pop("$ref", None)
    if ref is not None:
        node = {**definitions[ref.removeprefix("#/$defs/")], **node}
    options = node.get("anyOf")
    if options is not None:
        kept = [option for option in options if option != {"type": "null"}]
        if len(kept) == 1:
            del node["anyOf"]
            node = {**_resolve(kept[0], definitions), **node}
            if "default" in node and node["default"] is None:
                del node["default"]
    return node


def _is_secret(name: str, schema: Mapping[str, Any], siblings: Mapping[str, Any]) -> bool:
    """A SecretStr field (`format: password`, also inside a union) or its `*_file` twin."""
    if '"format": "password"' in json.dumps(schema):
        return True
    return name.endswith("_file") and name.removesuffix("_file") in siblings


def _adapt(
    node: Mapping[str, Any], definitions: Mapping[str, Any], path: tuple[str, ...]
) -> dict[str, Any]:
    node = _resolve(node, definitions)
    node.pop("title", None)
    if "properties" in node:
        properties = {
            name: _adapt(child, definitions, (*path, name))
            for name, child in node["properties"].items()
            if not _is_secret(name, child, node["properties"]) and (*path, name) not in CHART_OWNED
        }
        node["properties"] = properties
        node["additionalProperties"] = False
        required = [name for name in node.get("required", []) if name in properties]
        if required:
            node["required"] = required
        else:
            node.pop("required", None)
    elif isinstance(node.get("additionalProperties"), Mapping):
        node["additionalProperties"] = _adapt(
            node["additionalProperties"], definitions, (*path, "*")
        )
    node.update(copy.deepcopy(_VALIDATOR_FORMS.get(path, {})))
    # `type` first, the rest in pydantic's order: easier to read in the committed file.
    return {key: node[key] for key in sorted(node, key=lambda key: key != "type")}


def _has_path(schema: Mapping[str, Any], path: tuple[str, ...]) -> bool:
    node: Any = schema
    for part in path:
        node = (
            node.get("additionalProperties")
            if part == "*"
            else node.get("properties", {}).get(part)
        )
        if not isinstance(node, Mapping):
            return False
    return True


# --- values, as the chart sees them -------------------------------------------------------------


def config_defaults() -> dict[str, Any]:
    """The chart's default `config:`: the broker's own defaults, secrets left out."""
    defaults: dict[str, Any] = Settings.model_construct().model_dump(mode="json", exclude_none=True)
    for path in secret_fields():
        if len(path) == 1:
            defaults.pop(path[0], None)
            defaults.pop(f"{path[0]}_file", None)
    return defaults


def merge_values(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """`override` over `base` as Helm merges values: mappings key by key, anything else
    replaced, null removing the key."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, Mapping):
            below = merged.get(key)
            merged[key] = merge_values(below if isinstance(below, Mapping) else {}, value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def chart_values(*overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The chart's defaults with `overrides` merged over them in order (`helm -f a -f b`)."""
    values = merge_values(CHART_DEFAULTS, {"config": config_defaults()})
    for override in overrides:
        values = merge_values(values, override)
    return values


def chart_config(values: Mapping[str, Any]) -> dict[str, Any]:
    """The `config.yaml` of the chart's ConfigMap: `config:` plus, for every secret, the path of
    its file in the mounted Secret, and the settings the chart's own values make: TLS files,
    the metrics port, the JWKS reader's files (templates/_helpers.tpl, "monogoto-broker.config")."""
    config = copy.deepcopy(dict(_mapping(values.get("config"))))
    for item in secret_items(values):
        holder = config
        for part in item.secret.path[:-1]:
            holder = holder.setdefault(item.name if part == "*" else part, {})
        holder[f"{item.secret.path[-1]}_file"] = f"{SECRETS_DIR}/{item.key}"
    tests = _mapping(values.get("tests"))
    accounts = sorted(_mapping(config.get("accounts")))
    if tests.get("enabled") and accounts:
        config.setdefault("callers", {})[TEST_CALLER] = {
            "accounts": [tests.get("account") or accounts[0]],
            "api_key_sha256_file": f"{TEST_CALLER_DIR}/api-key-sha256",
        }
    tls = _mapping(values.get("tls"))
    if tls.get("enabled"):
        config["tls"] = {"cert_file": f"{TLS_DIR}/tls.crt", "key_file": f"{TLS_DIR}/tls.key"}
        if tls.get("clientCertificates"):
            config["tls"]["client_ca_file"] = f"{TLS_DIR}/ca.crt"
    metrics_port = _mapping(values.get("metrics")).get("port")
    if metrics_port:
        config["metrics_port"] = metrics_port
    if _mapping(values.get("kubernetesAuth")).get("enabled"):
        auth = config.setdefault("caller_auth", {})
        kubernetes = auth.setdefault("kubernetes", {})
        kubernetes.setdefault("jwks_url", IN_CLUSTER_JWKS_URL)
        kubernetes["jwks_ca_file"] = f"{KUBERNETES_DIR}/ca.crt"
        kubernetes["jwks_token_file"] = f"{KUBERNETES_DIR}/token"
    return config


@dataclass(frozen=True)
class SecretItem:
    """One key of the Secret the chart's config names, and what the values give for it."""

    secret: ChartSecret
    name: str  # the account's or caller's name, '' for the shared secrets
    value: str | list[str] | None  # None: not in the values

    @property
    def key(self) -> str:
        return self.secret.key.format(name=self.name)

    @property
    def place(self) -> str:
        return self.secret.place.format(name=self.name)

    @property
    def config_place(self) -> str:
        """Where the broker reports a problem with the file: `accounts.fleet.password_file`."""
        path = [self.name if part == "*" else part for part in self.secret.path]
        return ".".join(path) + "_file"

    def content(self) -> str:
        """The file's content in the chart-made Secret (a list: one item per line)."""
        if isinstance(self.value, list):
            return "\n".join(str(item) for item in self.value)
        return str(self.value)


def secret_items(values: Mapping[str, Any]) -> list[SecretItem]:
    """The Secret's keys the chart's config names, with the values given in `secrets:`."""
    config = _mapping(values.get("config"))
    existing = bool(_mapping(values.get("secrets")).get("existingSecret"))
    items: list[SecretItem] = []
    for secret in CHART_SECRETS:
        holders = secret.holders(dict(config)) if "*" in secret.path else [("", {}, ())]
        for name, entry, _ in holders:
            value: Any = values
            for part in secret.place.format(name=name).split("."):
                value = _mapping(value).get(part)
            if value in ("", [], None):
                value = None
            elif not isinstance(value, list):
                value = str(value)
            if secret.optional and (existing or value is None):
                continue
            if secret.needless(_mapping(entry)) and (existing or value is None):
                continue
            items.append(SecretItem(secret, name, value))
    return items


def chart_problems(values: Mapping[str, Any]) -> list[str]:
    """What makes the chart refuse to render (templates/_helpers.tpl, "monogoto-broker.validate")
    other than the broker's own checks (at least one account, callers naming known accounts)."""
    problems: list[str] = []
    secrets = _mapping(values.get("secrets"))
    redis_url, replicas = secrets.get("redisUrl"), values.get("replicaCount")
    if (
        isinstance(redis_url, str)
        and redis_url.startswith("memory:")
        and (_mapping(values.get("autoscaling")).get("enabled") or replicas != 1)
    ):
        problems.append(
            "secrets.redisUrl: memory:// is an in-process store: it needs replicaCount 1 and no "
            "autoscaling"
        )
    if not secrets.get("existingSecret"):
        problems += [
            f"{item.place}: required (or name a Secret of your own in secrets.existingSecret)"
            for item in secret_items(values)
            if item.value is None
        ]
    tests = _mapping(values.get("tests"))
    if tests.get("enabled"):
        config = _mapping(values.get("config"))
        if TEST_CALLER in _mapping(config.get("callers")):
            problems.append(
                f"config.callers.{TEST_CALLER}: the name of the chart's helm test caller "
                "(tests.enabled): choose another"
            )
        account, accounts = tests.get("account"), _mapping(config.get("accounts"))
        if account and accounts and account not in accounts:
            problems.append(f"tests.account: unknown account '{account}'")
    tls = _mapping(values.get("tls"))
    cert_manager = _mapping(tls.get("certManager"))
    if tls.get("enabled") and not (tls.get("existingSecret") or cert_manager.get("enabled")):
        problems.append(
            "tls.existingSecret: required with tls.enabled (a kubernetes.io/tls Secret), or set "
            "tls.certManager.enabled"
        )
    if cert_manager.get("enabled") and not _mapping(cert_manager.get("issuerRef")).get("name"):
        problems.append("tls.certManager.issuerRef.name: required with tls.certManager.enabled")
    caller_auth = _mapping(_mapping(values.get("config")).get("caller_auth"))
    if _mapping(values.get("kubernetesAuth")).get("enabled") and not caller_auth.get("kubernetes"):
        problems.append(
            "config.caller_auth.kubernetes: required with kubernetesAuth.enabled (the cluster's "
            "issuer and the audiences callers' tokens carry)"
        )
    metrics_port = _mapping(values.get("metrics")).get("port")
    if metrics_port and metrics_port == values.get("containerPort"):
        problems.append("metrics.port: must differ from containerPort")
    policy = _mapping(values.get("networkPolicy"))
    if policy.get("enabled") and not policy.get("callers"):
        problems.append(
            "networkPolicy.callers: required with networkPolicy.enabled (the peers that may call "
            "the broker; [{podSelector: {}}] for every pod of the release's namespace)"
        )
    return problems


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


# --- the check ----------------------------------------------------------------------------------


def check_helm_values(paths: Sequence[Path]) -> str:
    """Check what the chart would mount with the values files `paths` (merged in order, as
    `helm -f`); returns a one-line summary, raises ConfigError with one line per problem."""
    values = chart_values(*(_read_yaml(path) for path in paths))
    problems = [
        f"{key}: must be a mapping"
        for key in ("config", "secrets", "networkPolicy", "autoscaling")
        if not isinstance(values.get(key), Mapping)
    ]
    if not isinstance(values.get("extraEnv"), list):
        problems.append("extraEnv: must be a list")
    if problems:
        raise ConfigError(problems)
    problems += _secrets_in_config(values["config"])
    problems += _chart_owned_in_config(values["config"])
    problems += chart_problems(values)
    config = chart_config(values)
    env, unseen = _pod_environment(values["extraEnv"], problems)
    items = secret_items(values)
    existing = values["secrets"].get("existingSecret")
    settings: Settings | None = None
    with tempfile.TemporaryDirectory(prefix="helm-values-") as directory:
        for item in items:
            given = not existing and item.value is not None
            text = item.content() if given else item.secret.stand_in()
            (Path(directory) / item.key).write_text(text + "\n", encoding="utf-8")
        local = _with_local_files(config, Path(directory))
        try:
            with _environment(env):
                settings = build_settings(local)
        except ConfigError as error:
            places = {item.config_place: item for item in items}
            problems += [
                _from_env(_values_problem(problem, places), env).replace(directory, SECRETS_DIR)
                for problem in error.problems
            ]
    if problems or settings is None:
        raise ConfigError(list(dict.fromkeys(problems)))
    return _summary(paths, values, settings=settings, existing=existing, items=items, unseen=unseen)


def _with_local_files(config: Mapping[str, Any], directory: Path) -> dict[str, Any]:
    """`config` with the chart's mounts moved into `directory`: the Secret's files (already
    written there), and stand-ins of the same shape for what only the cluster holds (the helm
    test caller's digest, the TLS Secret's certificate, key and CA, the JWKS reader's token)."""
    text = json.dumps(config).replace(SECRETS_DIR, str(directory))
    if TEST_CALLER_DIR in text:
        test_caller = directory / "test-caller"
        test_caller.mkdir()
        (test_caller / "api-key-sha256").write_text(new_api_key()[1], encoding="utf-8")
        text = text.replace(TEST_CALLER_DIR, str(test_caller))
    for mounted, stand_in in ((TLS_DIR, "tls"), (KUBERNETES_DIR, "kubernetes")):
        if mounted in text:
            text = text.replace(mounted, str(write_stand_ins(directory / stand_in)))
    local: dict[str, Any] = json.loads(text)
    return local


def _summary(
    paths: Sequence[Path],
    values: Mapping[str, Any],
    *,
    settings: Settings,
    existing: str | None,
    items: Sequence[SecretItem],
    unseen: Sequence[str],
) -> str:
    """check-config --helm-values's line for values that pass: what the broker gets, and what
    the check had to take as present."""
    test_caller = settings.callers.get(TEST_CALLER)
    callers = len(settings.callers) - (test_caller is not None)
    summary = (
        f"{', '.join(str(path) for path in paths)}: OK as the chart would mount it "
        f"({_count(len(settings.accounts), 'account')}, {_count(callers, 'caller')}"
    )
    if test_caller is not None:
        summary += f"; helm test fetches a token of {test_caller.accounts[0]}"
    summary += ")"
    if existing:
        keys = ", ".join(item.key for item in items)
        summary += f"; taken as present in Secret {existing}, not checked: {keys}"
    unseen_files = [
        what
        for what, enabled in (
            ("the TLS certificate", _mapping(values.get("tls")).get("enabled")),
            ("the JWKS reader's token", _mapping(values.get("kubernetesAuth")).get("enabled")),
        )
        if enabled
    ]
    if unseen_files:
        summary += f"; taken as present: {' and '.join(unseen_files)}"
    if unseen:
        summary += f"; not checked (extraEnv valueFrom): {', '.join(unseen)}"
    return summary


def write_stand_ins(directory: Path) -> Path:
    """Write a self-signed certificate (it is its own CA) as `tls.crt` and `ca.crt`, its key as
    `tls.key`, and a `token` into `directory`: what the chart's TLS Secret and JWKS reader's
    volume hold, for a check that cannot see them."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stand-in")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir()
    pem = certificate.public_bytes(serialization.Encoding.PEM)
    (directory / "tls.crt").write_bytes(pem)
    (directory / "ca.crt").write_bytes(pem)
    (directory / "tls.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (directory / "token").write_text("taken-as-present\n", encoding="utf-8")
    return directory


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _secrets_in_config(config: dict[str, Any]) -> list[str]:
    """Secrets (or their `*_file` twins) written into `config:`, which the chart does not take
    (its schema refuses them): one problem each; they are left out of the rest of the check."""
    problems: list[str] = []
    for secret in CHART_SECRETS:
        field = secret.path[-1]
        for name, holder, loc in secret.holders(config):
            for key in (field, f"{field}_file"):
                if key in holder:
                    del holder[key]
                    problems.append(
                        f"{'.'.join(('config', *loc, key))}: the chart takes no secrets in "
                        f"config: set {secret.place.format(name=name)} or the Secret's key "
                        f"{secret.key.format(name=name)}"
                    )
    return problems


def _chart_owned_in_config(config: dict[str, Any]) -> list[str]:
    """Settings the chart makes itself written into `config:` (its schema refuses them): one
    problem each, naming the value to use; they are left out of the rest of the check."""
    problems: list[str] = []
    for path, value in CHART_OWNED.items():
        holder: Any = config
        for part in path[:-1]:
            holder = holder.get(part) if isinstance(holder, dict) else None
        if isinstance(holder, dict) and path[-1] in holder:
            del holder[path[-1]]
            problems.append(f"config.{'.'.join(path)}: set by the chart: use {value}")
    return problems


def _pod_environment(extra_env: list[Any], problems: list[str]) -> tuple[dict[str, str], list[str]]:
    """The pod's `BROKER_*` variables from the chart's `extraEnv`, and the names of those whose
    value comes from elsewhere (`valueFrom`), which the check cannot see."""
    env: dict[str, str] = {}
    unseen: list[str] = []
    for index, entry in enumerate(extra_env):
        name = _mapping(entry).get("name")
        if not isinstance(name, str) or not name.upper().startswith(ENV_PREFIX):
            continue
        if name.upper() == CONFIG_ENV:
            problems.append(f"extraEnv[{index}]: {CONFIG_ENV} is set by the chart")
        elif "valueFrom" in entry:
            unseen.append(name)
        elif not isinstance(entry.get("value", ""), str):
            problems.append(f"extraEnv[{index}].value: must be a string (quote it)")
        else:
            env[name] = entry.get("value", "")
    return env, unseen


@contextmanager
def _environment(env: Mapping[str, str]) -> Iterator[None]:
    """Run with `env` as the only `BROKER_*` variables of this process (a pod's environment
    instead of the operator's shell)."""
    saved = {
        name: value for name, value in os.environ.items() if name.upper().startswith(ENV_PREFIX)
    }
    for name in saved:
        del os.environ[name]
    os.environ.update(env)
    try:
        yield
    finally:
        for name in env:
            os.environ.pop(name, None)
        os.environ.update(saved)


def _from_env(problem: str, env: Mapping[str, str]) -> str:
    """`problem`, saying so when an `extraEnv` variable sets (part of) the field it names."""
    place = problem.partition(": ")[0]
    for name in env:
        field = "config." + name[len(ENV_PREFIX) :].lower().replace("__", ".")
        if place == field or place.startswith((f"{field}.", f"{field}[")):
            return f"{problem} (set by extraEnv {name})"
    return problem


_LINE = re.compile(r"line (\d+)")


def _values_problem(problem: str, places: Mapping[str, SecretItem]) -> str:
    """A problem line of the broker's, named by its place in the values: `config.` before a
    config field, `secrets.*` for a secret's file (a list's item for a line of its file)."""
    if problem.startswith(ENV_PREFIX):
        return problem  # an extraEnv variable, named as such
    place, _, text = problem.partition(": ")
    item = places.get(place)
    if item is None:
        return f"config: {text}" if place == "config" else f"config.{problem}"
    if isinstance(item.value, list):
        first = _LINE.match(text)
        if first:
            text = text[first.end() :].removeprefix(": ")
            return f"{item.place}[{int(first.group(1)) - 1}]: " + _LINE.sub(
                lambda match: f"{item.place}[{int(match.group(1)) - 1}]", text
            )
    return f"{item.place}: {text}"


# --- python -m service.helm_values ---------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Write the generated `config` part into the chart's values schema, or only compare."""
    parser = argparse.ArgumentParser(
        prog="python -m service.helm_values",
        description="Generate the `config` part of the chart's values.schema.json from the "
        "broker's config model.",
    )
    parser.add_argument("schema", type=Path, metavar="SCHEMA_FILE", help="values.schema.json")
    parser.add_argument(
        "--check", action="store_true", help="only say whether the file is up to date (exit 1)"
    )
    args = parser.parse_args(argv)
    current = args.schema.read_text(encoding="utf-8")
    wanted = json.dumps(values_schema(json.loads(current)), indent=2, ensure_ascii=False) + "\n"
    if current == wanted:
        print(f"{args.schema}: up to date")
        return 0
    if args.check:
        print(f"{args.schema}: the config part is not the generated one: run scripts/chart-schema")
        return 1
    args.schema.write_text(wanted, encoding="utf-8")
    print(f"{args.schema}: config part written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
