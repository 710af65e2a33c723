"""parse_config: the typed, frozen result, and one NetloaderConfigError per bad key."""

import dataclasses
import json
import re
from pathlib import Path

import pytest

from vllm_ascend.model_loader.netloader import config
from vllm_ascend.model_loader.netloader.config import (
    DEFAULT_TIMEOUT_S,
    NetloaderConfig,
    NetloaderConfigError,
    SourceEntry,
    parse_config,
)


def entry(device_id=0, sources=None):
    return {"device_id": device_id, "sources": sources or ["127.0.0.1:5000"]}


def raises_naming(key: str, extra) -> NetloaderConfigError:
    with pytest.raises(NetloaderConfigError) as info:
        parse_config(extra)
    assert key in str(info.value)
    return info.value


def write_json(path, data) -> str:
    path.write_text(json.dumps(data), encoding="utf-8")
    return str(path)


# --- valid configs ---------------------------------------------------------------


@pytest.mark.parametrize("extra", [None, {}])
def test_empty_config_gives_defaults(extra):
    config = parse_config(extra)
    assert config == NetloaderConfig()
    assert config.sources == ()
    assert config.model is None and config.listen_port is None and config.output_prefix is None
    assert config.timeout_s == DEFAULT_TIMEOUT_S
    assert config.relay is True
    assert config.sources_for_rank(0) == ()
    assert config.listen_port_for_rank(3) == 0


def test_full_config_is_typed_and_frozen(tmp_path):
    extra = {
        "SOURCE": [
            {"device_id": 0, "sources": ["10.0.0.1:5000", "10.0.0.2:5000"]},
            {"device_id": 1, "sources": ["10.0.0.1:5001"]},
            {"device_id": 0, "sources": ["[::1]:6000"]},
        ],
        "MODEL": "org/model",
        "LISTEN_PORT": 7000,
        "OUTPUT_PREFIX": str(tmp_path / "seed_"),
        "TIMEOUT": 12,
    }
    config = parse_config(extra)
    assert config.sources == (
        SourceEntry(0, ("10.0.0.1:5000", "10.0.0.2:5000")),
        SourceEntry(1, ("10.0.0.1:5001",)),
        SourceEntry(0, ("[::1]:6000",)),
    )
    assert config.model == "org/model"
    assert config.listen_port == 7000
    assert config.output_prefix == str(tmp_path / "seed_")
    assert config.timeout_s == 12.0 and isinstance(config.timeout_s, float)
    # Entries for the same device are concatenated in the order they were written.
    assert config.sources_for_rank(0) == ("10.0.0.1:5000", "10.0.0.2:5000", "[::1]:6000")
    assert config.sources_for_rank(1) == ("10.0.0.1:5001",)
    assert config.sources_for_rank(2) == ()
    assert config.listen_port_for_rank(0) == 7000
    assert config.listen_port_for_rank(5) == 7005
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.model = "other"  # type: ignore[misc]
    # The parsed config must not alias the caller's mutable input.
    extra["SOURCE"][0]["sources"].append("10.0.0.3:5000")
    assert config.sources_for_rank(0) == ("10.0.0.1:5000", "10.0.0.2:5000", "[::1]:6000")


def test_listen_port_for_rank_past_65535_names_the_key():
    config = parse_config({"LISTEN_PORT": 65530})
    assert config.listen_port_for_rank(5) == 65535
    with pytest.raises(NetloaderConfigError, match="LISTEN_PORT"):
        config.listen_port_for_rank(6)


def test_ipv6_source_accepted():
    config = parse_config({"SOURCE": [entry(sources=["[::1]:5000"])]})
    assert config.sources_for_rank(0) == ("[::1]:5000",)


def test_output_prefix_without_directory_is_relative_to_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_config({"OUTPUT_PREFIX": "seed_"}).output_prefix == "seed_"


@pytest.mark.parametrize("timeout", [0.5, 3600])
def test_timeout_bounds_accepted(timeout):
    assert parse_config({"TIMEOUT": timeout}).timeout_s == float(timeout)


@pytest.mark.parametrize("port", [1, 65535])
def test_listen_port_bounds_accepted(port):
    assert parse_config({"LISTEN_PORT": port}).listen_port == port


# --- invalid configs: each error names its key ---------------------------------


def test_extra_config_not_a_dict():
    with pytest.raises(NetloaderConfigError):
        parse_config(["SOURCE"])  # type: ignore[arg-type]


def test_unknown_key_is_named():
    raises_naming("SOURCES", {"SOURCES": [entry()], "MODEL": "m"})


@pytest.mark.parametrize(
    "source, key",
    [
        ({"device_id": 0, "sources": ["a:1"]}, "SOURCE"),  # not a list
        ("a:1", "SOURCE"),
        ([{"sources": ["a:1"]}], "SOURCE[0]"),  # missing device_id
        ([{"device_id": 0}], "SOURCE[0]"),  # missing sources
        ([dict(entry(), extra=1)], "SOURCE[0]"),
        ([entry(), "a:1"], "SOURCE[1]"),  # entry not an object
        ([entry(device_id=-1)], "SOURCE[0].device_id"),
        ([entry(device_id=True)], "SOURCE[0].device_id"),
        ([entry(device_id="0")], "SOURCE[0].device_id"),
        ([entry(device_id=1.0)], "SOURCE[0].device_id"),
        ([{"device_id": 0, "sources": []}], "SOURCE[0].sources"),
        ([{"device_id": 0, "sources": "a:1"}], "SOURCE[0].sources"),
        ([entry(sources=["a:1", "10.0.0.1"])], "SOURCE[0].sources[1]"),  # no port
        ([entry(sources=["10.0.0.1:"])], "SOURCE[0].sources[0]"),
        ([entry(sources=[":5000"])], "SOURCE[0].sources[0]"),  # no host
        ([entry(sources=["10.0.0.1:0"])], "SOURCE[0].sources[0]"),
        ([entry(sources=["10.0.0.1:70000"])], "SOURCE[0].sources[0]"),
        ([entry(sources=["10.0.0.1:50a0"])], "SOURCE[0].sources[0]"),
        ([entry(sources=["10.0.0.1:-5"])], "SOURCE[0].sources[0]"),
        ([entry(sources=[5000])], "SOURCE[0].sources[0]"),
        ([entry(), entry(1, ["b:1", "c:99999"])], "SOURCE[1].sources[1]"),
        # Each of these passed before and failed later as a name lookup.
        ([entry(sources=["fe80::1"])], "SOURCE[0].sources[0]"),  # IPv6 without brackets
        ([entry(sources=["::1"])], "SOURCE[0].sources[0]"),
        ([entry(sources=["[::1:7000"])], "SOURCE[0].sources[0]"),
        ([entry(sources=["[::1]7000"])], "SOURCE[0].sources[0]"),
        ([entry(sources=["[10.0.0.1]:7000"])], "SOURCE[0].sources[0]"),  # v4 in brackets
        ([entry(sources=["tcp://h:7000"])], "SOURCE[0].sources[0]"),
        ([entry(sources=[" h:7000"])], "SOURCE[0].sources[0]"),
        ([entry(sources=["h:7000 "])], "SOURCE[0].sources[0]"),
        ([entry(sources=["h_1:7000"])], "SOURCE[0].sources[0]"),
        ([entry(sources=["-h:7000"])], "SOURCE[0].sources[0]"),
        ([entry(sources=["a" * 64 + ".example:7000"])], "SOURCE[0].sources[0]"),
        ([entry(sources=["exämple.com:7000"])], "SOURCE[0].sources[0]"),
        ([entry(sources=["h:007000"])], "SOURCE[0].sources[0]"),
    ],
)
def test_bad_source_names_the_key(source, key):
    raises_naming(key, {"SOURCE": source})


@pytest.mark.parametrize(
    "address",
    ["10.0.0.1:7000", "seed-0.netloader.svc.cluster.local:7000", "localhost:1",
     "[::1]:7000", "[fe80::1%eth0]:7000", "[2001:db8::5]:65535", "a" * 63 + ".b:7000"],
)
def test_good_sources_are_accepted(address):
    assert parse_config({"SOURCE": [entry(sources=[address])]}).sources_for_rank(0) == (address,)


@pytest.mark.parametrize("plane", ["tcp", "collective"])
def test_data_plane(plane):
    assert parse_config({"DATA_PLANE": plane}).data_plane == plane
    assert parse_config({}).data_plane is None


@pytest.mark.parametrize("plane", ["gloo", "TCP", "", None, 1])
def test_bad_data_plane_names_the_key(plane):
    raises_naming("DATA_PLANE", {"DATA_PLANE": plane})


def test_expected_fingerprint():
    assert parse_config({"EXPECTED_FINGERPRINT": "ab" * 32}).expected_fingerprint == "ab" * 32
    assert parse_config({}).expected_fingerprint is None


@pytest.mark.parametrize("value", ["AB" * 32, "ab" * 31, "ab" * 33, "z" * 64, 5, None])
def test_bad_expected_fingerprint_names_the_key(value):
    raises_naming("EXPECTED_FINGERPRINT", {"EXPECTED_FINGERPRINT": value})


def test_relay_can_be_turned_off():
    assert parse_config({"RELAY": False}).relay is False


@pytest.mark.parametrize("relay", [0, 1, "false", None])
def test_bad_relay(relay):
    raises_naming("RELAY", {"RELAY": relay})


def test_relay_fanout_defaults_to_a_chain_and_takes_a_tree():
    assert parse_config({}).relay_fanout == 1
    assert parse_config({"RELAY_FANOUT": 3}).relay_fanout == 3
    assert parse_config({"relay_fanout": 2}).relay_fanout == 2


@pytest.mark.parametrize("fanout", [0, 5, -1, 2.0, "2", True, None])
def test_bad_relay_fanout(fanout):
    raises_naming("RELAY_FANOUT", {"RELAY_FANOUT": fanout})


@pytest.mark.parametrize("model", ["", None, 3])
def test_bad_model(model):
    raises_naming("MODEL", {"MODEL": model})


@pytest.mark.parametrize("port", [0, 65536, -1, "5000", True, 5000.0, None])
def test_bad_listen_port(port):
    raises_naming("LISTEN_PORT", {"LISTEN_PORT": port})


def test_output_prefix_in_missing_directory(tmp_path):
    raises_naming("OUTPUT_PREFIX", {"OUTPUT_PREFIX": str(tmp_path / "missing" / "seed_")})


@pytest.mark.parametrize("prefix", ["", None, 1])
def test_bad_output_prefix(prefix):
    raises_naming("OUTPUT_PREFIX", {"OUTPUT_PREFIX": prefix})


@pytest.mark.parametrize("timeout", [0, -1, -0.5, True, False, 3600.5, 1e9, "30", None])
def test_bad_timeout(timeout):
    raises_naming("TIMEOUT", {"TIMEOUT": timeout})


def test_bad_timeout_nan_and_inf():
    raises_naming("TIMEOUT", {"TIMEOUT": float("nan")})
    raises_naming("TIMEOUT", {"TIMEOUT": float("inf")})


def test_first_bad_key_still_fails_when_others_are_valid():
    raises_naming("TIMEOUT", {"MODEL": "m", "LISTEN_PORT": 5000, "TIMEOUT": 0})


def test_port_with_non_ascii_digit_names_the_key():
    raises_naming("SOURCE[0].sources[0]", {"SOURCE": [entry(sources=["10.0.0.1:²"])]})


# --- CONFIG_FILE -----------------------------------------------------------------


def test_config_file_values_win_over_inline(tmp_path):
    path = write_json(tmp_path / "nl.json", {"MODEL": "from-file", "TIMEOUT": 5})
    config = parse_config({"CONFIG_FILE": path, "MODEL": "inline", "LISTEN_PORT": 6000})
    assert config.model == "from-file"
    assert config.timeout_s == 5.0
    assert config.listen_port == 6000  # inline keys the file does not set are kept


def test_config_file_values_are_validated(tmp_path):
    path = write_json(tmp_path / "nl.json", {"LISTEN_PORT": 0})
    raises_naming("LISTEN_PORT", {"CONFIG_FILE": path, "LISTEN_PORT": 6000})


def test_config_file_with_sources(tmp_path):
    path = write_json(tmp_path / "nl.json", {"SOURCE": [entry(2, ["h:1", "h:2"])]})
    assert parse_config({"CONFIG_FILE": path}).sources_for_rank(2) == ("h:1", "h:2")


def test_config_file_missing(tmp_path):
    raises_naming("CONFIG_FILE", {"CONFIG_FILE": str(tmp_path / "absent.json")})


def test_config_file_not_json(tmp_path):
    path = tmp_path / "nl.json"
    path.write_text("{'MODEL': 'single quotes'}", encoding="utf-8")
    raises_naming("CONFIG_FILE", {"CONFIG_FILE": str(path)})


def test_config_file_holding_a_list(tmp_path):
    path = write_json(tmp_path / "nl.json", [{"MODEL": "m"}])
    raises_naming("CONFIG_FILE", {"CONFIG_FILE": path})


def test_config_file_naming_another_config_file(tmp_path):
    inner = write_json(tmp_path / "inner.json", {"MODEL": "m"})
    outer = write_json(tmp_path / "outer.json", {"CONFIG_FILE": inner})
    raises_naming("CONFIG_FILE", {"CONFIG_FILE": outer})


def test_config_file_with_unknown_key(tmp_path):
    path = write_json(tmp_path / "nl.json", {"MODEL": "m", "LISTENPORT": 5000})
    raises_naming("LISTENPORT", {"CONFIG_FILE": path})


@pytest.mark.parametrize("value", ["", 3, ["a.json"]])
def test_config_file_value_not_a_path(value):
    raises_naming("CONFIG_FILE", {"CONFIG_FILE": value})


# --- the shared secret -----------------------------------------------------------

SECRET = "s3cret-" + "x" * 20


def test_no_secret_by_default():
    assert parse_config({}, environ={}).secret is None


def test_secret_from_environment_is_stripped():
    config = parse_config({}, environ={"NETLOADER_SECRET": f"  {SECRET}\n"})
    assert config.secret == SECRET.encode()


def test_secret_file_wins_over_environment(tmp_path):
    path = tmp_path / "secret"
    path.write_text(SECRET + "\n")
    config = parse_config({"SECRET_FILE": str(path)}, environ={"NETLOADER_SECRET": "y" * 32})
    assert config.secret == SECRET.encode()


def test_secret_file_from_config_file(tmp_path):
    path = tmp_path / "secret"
    path.write_text(SECRET)
    extra = {"CONFIG_FILE": write_json(tmp_path / "c.json", {"SECRET_FILE": str(path)})}
    assert parse_config(extra, environ={}).secret == SECRET.encode()


def test_secret_stays_out_of_repr_and_errors(tmp_path):
    config = parse_config({"MODEL": "m"}, environ={"NETLOADER_SECRET": SECRET})
    assert SECRET not in repr(config) and SECRET not in str(config)
    with pytest.raises(NetloaderConfigError) as info:
        parse_config({"MODEL": 3}, environ={"NETLOADER_SECRET": SECRET})
    assert SECRET not in str(info.value)


@pytest.mark.parametrize("short", ["", "   ", "only-15-bytes!!"])
def test_short_secret_is_refused_without_echoing_it(short):
    with pytest.raises(NetloaderConfigError) as info:
        parse_config({}, environ={"NETLOADER_SECRET": short})
    assert "NETLOADER_SECRET" in str(info.value) and "16 bytes" in str(info.value)
    if short.strip():
        assert short not in str(info.value)


def test_inline_secret_is_refused_and_not_echoed():
    with pytest.raises(NetloaderConfigError) as info:
        parse_config({"SECRET": SECRET}, environ={})
    assert "SECRET_FILE" in str(info.value) and SECRET not in str(info.value)


def test_missing_secret_file_names_the_key(tmp_path):
    with pytest.raises(NetloaderConfigError) as info:
        parse_config({"SECRET_FILE": str(tmp_path / "absent")}, environ={})
    assert "SECRET_FILE" in str(info.value)


@pytest.mark.parametrize("value", [None, "", 3, ["a"]])
def test_secret_file_not_a_path(value):
    with pytest.raises(NetloaderConfigError) as info:
        parse_config({"SECRET_FILE": value}, environ={})
    assert "SECRET_FILE" in str(info.value)


def test_min_rate():
    assert parse_config({}).min_rate_mb_per_s == 1.0
    assert parse_config({"MIN_RATE_MB_PER_S": 0.25}).min_rate_mb_per_s == 0.25


@pytest.mark.parametrize("rate", [0, -1, "1", True, None])
def test_bad_min_rate_names_the_key(rate):
    raises_naming("MIN_RATE_MB_PER_S", {"MIN_RATE_MB_PER_S": rate})


def test_a_send_limit_below_the_minimum_rate_names_both_keys():
    error = raises_naming("SEND_LIMIT_MB_PER_S", {"SEND_LIMIT_MB_PER_S": 0.5})
    assert "MIN_RATE_MB_PER_S" in str(error)
    assert parse_config(
        {"SEND_LIMIT_MB_PER_S": 0.5, "MIN_RATE_MB_PER_S": 0.5}
    ).send_limit_mb_per_s == 0.5


@pytest.mark.parametrize("limit, timeout", [(0.1, 5), (1, 5), (0.25, 30)])
def test_a_send_limit_that_moves_less_than_two_parts_per_timeout_names_both_keys(
    limit, timeout
):
    # A relay below this seed passes 4 MiB parts on at about this rate: its clients
    # would wait longer than TIMEOUT without a byte.
    error = raises_naming("SEND_LIMIT_MB_PER_S", {
        "SEND_LIMIT_MB_PER_S": limit, "TIMEOUT": timeout, "MIN_RATE_MB_PER_S": 0.1,
    })
    assert "TIMEOUT" in str(error) and "4 MiB parts" in str(error)
    assert parse_config({"SEND_LIMIT_MB_PER_S": limit, "TIMEOUT": 9 / limit,
                         "MIN_RATE_MB_PER_S": 0.1}).send_limit_mb_per_s == limit


# --- keys from configs written for vllm-ascend's netloader ---------------------------


def test_int8_cache_defaults_to_vllm_ascends_no_and_the_layout_to_auto():
    """A drop-in vllm-ascend config never costs memory nobody asked for."""
    config = parse_config({})
    assert (config.int8_cache, config.int8_cache_name, config.layout) == ("no", None, "auto")


@pytest.mark.parametrize("value, layout", [("auto", "auto"), ("Processed", "processed"),
                                           ("loaded", "loaded")])
def test_layout_values(value, layout):
    assert parse_config({"LAYOUT": value}).layout == layout


@pytest.mark.parametrize("value", ["runtime", "", None, 1])
def test_a_bad_layout_names_the_key(value):
    with pytest.raises(NetloaderConfigError, match="LAYOUT must be one of"):
        parse_config({"LAYOUT": value})


def test_vllm_ascend_lowercase_keys_mean_the_uppercase_ones():
    config = parse_config({
        "source": [{"device_id": 0, "sources": ["10.0.0.1:7000"]}], "model": "m",
        "listen_port": 7100, "int8_cache": "dram", "Output_Prefix": "/tmp/seed",
    }, environ={})
    assert config.sources_for_rank(0) == ("10.0.0.1:7000",)
    assert (config.model, config.listen_port, config.int8_cache) == ("m", 7100, "dram")
    assert config.output_prefix == "/tmp/seed"


def test_two_spellings_of_one_key_are_an_error_naming_both():
    with pytest.raises(NetloaderConfigError, match="'LISTEN_PORT' and 'listen_port'.*LISTEN_PORT"):
        parse_config({"LISTEN_PORT": 7000, "listen_port": 7001}, environ={})


def test_a_lowercase_secret_inline_is_refused_as_the_uppercase_one():
    with pytest.raises(NetloaderConfigError, match="SECRET must not be given inline"):
        parse_config({"secret": "x" * 32}, environ={})


def test_lowercase_keys_in_a_config_file_win_over_inline_ones(tmp_path):
    path = tmp_path / "netloader.json"
    path.write_text('{"listen_port": 7200, "config_file": "other.json"}')
    with pytest.raises(NetloaderConfigError, match="must not name another CONFIG_FILE"):
        parse_config({"CONFIG_FILE": str(path)}, environ={})
    path.write_text('{"listen_port": 7200}')
    assert parse_config({"CONFIG_FILE": str(path), "LISTEN_PORT": 7000},
                        environ={}).listen_port == 7200


@pytest.mark.parametrize("value, mode", [("hbm", "hbm"), ("DRAM", "dram"), ("no", "no")])
def test_int8_cache_modes(value, mode):
    assert parse_config({"INT8_CACHE": value}).int8_cache == mode


@pytest.mark.parametrize("value", ["npu", "", None, 1, ["hbm"]])
def test_bad_int8_cache_names_the_key(value):
    with pytest.raises(NetloaderConfigError, match="INT8_CACHE must be one of"):
        parse_config({"INT8_CACHE": value})


def test_int8_cache_name_is_a_list_of_name_fragments():
    config = parse_config({"INT8_CACHE": "dram", "INT8_CACHE_NAME": ["qweight", "scales"]})
    assert config.int8_cache_name == ("qweight", "scales")
    assert parse_config({"INT8_CACHE_NAME": None}).int8_cache_name is None


@pytest.mark.parametrize("value", ["qweight", [""], [1], {"a": 1}, []])
def test_bad_int8_cache_name_names_the_key(value):
    with pytest.raises(NetloaderConfigError, match="INT8_CACHE_NAME must be a non-empty list"):
        parse_config({"INT8_CACHE_NAME": value})


def test_parsing_the_config_imports_neither_torch_nor_vllm():
    """The config and the wire stay light: a tool (or vLLM's API server) that only
    parses the extra config does not pay torch's import."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from vllm_ascend.model_loader.netloader.config import parse_config\n"
        "parse_config({'SOURCE': [{'dns': 'seeds:7000'}], 'REGISTRY': 'redis://r:6379/0'},"
        " environ={})\n"
        "print(sorted(m for m in ('torch', 'vllm') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


def test_every_key_has_a_row_in_the_guides_configuration_table():
    # A key added without a row is one operators cannot find (RELAY_FANOUT nearly was).
    guide = (Path(__file__).resolve().parents[3]
             / "docs/source/user_guide/feature_guide/netloader.md").read_text("utf-8")
    table = guide[guide.index("## Configuration"):guide.index("### Timeouts")]
    rows = set(re.findall(r"^\| `([A-Z0-9_]+)` \|", table, re.M))
    assert set(config._PARSERS) | {"CONFIG_FILE", "SECRET_FILE"} <= rows, (
        set(config._PARSERS) - rows)
