"""CONTRACT §1: durations in Go's syntax and Bus booleans, read by one parser each (values.py)."""
import pytest

from bus_containers_provider.config import ENVIRONMENT, ConfigError, load_settings
from bus_containers_provider.values import MAX_SECONDS, parse_bool, parse_duration
from conftest import env


@pytest.mark.parametrize("text,seconds", [
    ("1500ms", 1.5), ("30s", 30), ("5m", 300), ("1h30m", 5400), ("1m30s", 90), ("1.5h", 5400),
    ("2h45m30.5s", 9930.5), ("300us", 300e-6), ("300µs", 300e-6), ("300μs", 300e-6), ("250ns", 250e-9),
    ("1h0m0.5s", 3600.5), (".5s", 0.5), ("5.s", 5), ("+90s", 90), ("1s500ms", 1.5), ("0", 0), ("30", 30),
    ("1.25", 1.25), ("24h", 86400),
])
def test_go_durations_and_bare_seconds(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds, rel=1e-12)


@pytest.mark.parametrize("text", [
    "5x", "1h30", "-1s", "-0", "", " ", "1d", "1w", "1y", "1H", "1S", "1h 30m", "h", ".", ".s", "1..5s",
    "1e3s", "1e3", "one", "1h-30m", "++1s", "١s",
])
def test_malformed_or_negative_is_refused_and_the_message_shows_the_syntax(text):
    """Go's grammar, less its negative durations (a wait or a lifetime below zero means nothing here)."""
    with pytest.raises(ValueError) as refused:
        parse_duration(text)
    message = str(refused.value)
    assert message.startswith(repr(text))
    assert "Go's duration syntax (1500ms, 30s, 1m30s, 1.5h, 2h45m30.5s; units ns, us, ms, s, m, h)" in message


@pytest.mark.parametrize("text", ["2562048h", "9" * 400 + "h", f"{MAX_SECONDS * 2:.0f}s"])
def test_nothing_longer_than_gos_longest_duration(text):
    assert parse_duration("2562047h") == 2562047 * 3600
    with pytest.raises(ValueError, match="longer than the longest duration"):
        parse_duration(text)


@pytest.mark.parametrize("word", ["1", "true", "yes", "on", "TRUE", "True", "Yes", "ON", "oN", " true "])
def test_true_words_in_any_case(word):
    assert parse_bool(word) is True


@pytest.mark.parametrize("word", ["0", "false", "no", "off", "FALSE", "No", "OFF", "Off"])
def test_false_words_in_any_case(word):
    assert parse_bool(word) is False


@pytest.mark.parametrize("word", ["2", "maybe", " ", "", "y", "n", "enabled", "t", "-1", "01", "truee"])
def test_any_other_word_is_refused_naming_the_accepted_ones(word):
    with pytest.raises(ValueError) as refused:
        parse_bool(word)
    assert f"{word!r} is not a boolean: use 1, true, yes, on or 0, false, no, off (any case)" == str(refused.value)


BOOLEANS = [name for name, (_, parse) in ENVIRONMENT.items() if parse is parse_bool]
DURATIONS = [name for name, (_, parse) in ENVIRONMENT.items() if parse is parse_duration]


def test_every_switch_and_duration_variable_uses_the_one_parser():
    """No variable reads a switch or a duration its own way: each field's parser is one of the two."""
    assert set(BOOLEANS) == {"BUS_EVENTS_LISTENER_REQUIRED", "BUS_EVENTS_LISTENER_RETRY"}
    assert {"BUS_CONTAINERS_REQUEST_TIMEOUT", "BUS_CONTAINERS_RUN_TIMEOUT_GRACE", "BUS_CONTAINERS_MAX_RUN_TIMEOUT",
            "BUS_CONTAINERS_IDEMPOTENCY_TTL", "BUS_EVENTS_LISTENER_RETRY_MIN", "BUS_EVENTS_LISTENER_RETRY_MAX",
            "BUS_EVENTS_LISTENER_DOWN_GRACE", "BUS_EVENTS_LISTENER_IDLE_TIMEOUT",
            "BUS_CONTAINERS_SHUTDOWN_GRACE"} <= set(DURATIONS)
    from bus_containers_provider.config import Settings

    for name, (field, parse) in ENVIRONMENT.items():
        default = Settings.__dataclass_fields__[field].default
        if isinstance(default, bool):
            assert parse is parse_bool, name
        elif isinstance(default, float):
            assert parse is parse_duration, name


@pytest.mark.parametrize("variable", BOOLEANS)
@pytest.mark.parametrize("word,expected", [("true", True), ("Yes", True), ("ON", True), ("1", True),
                                           ("false", False), ("NO", False), ("off", False), ("0", False)])
def test_boolean_variables_read_the_bus_words(variable, word, expected):
    settings = load_settings(env(**{variable: word}))
    field = ENVIRONMENT[variable][0]
    assert getattr(settings, field) is expected


@pytest.mark.parametrize("variable", BOOLEANS)
@pytest.mark.parametrize("word", ["2", "maybe", " ", ""])
def test_a_boolean_variable_with_another_value_is_a_start_up_error(variable, word):
    with pytest.raises(ConfigError) as refused:
        load_settings(env(**{variable: word}))
    assert str(refused.value).startswith(f"{variable}: ") and "1, true, yes, on or 0, false, no, off" in str(
        refused.value)


@pytest.mark.parametrize("variable", DURATIONS)
def test_duration_variables_read_go_durations(variable):
    # Chosen so every bound holds: MAX above MIN, and every duration above zero.
    settings = load_settings(env(**{variable: "1h30m", "BUS_EVENTS_LISTENER_RETRY_MAX": "2h45m30.5s"}))
    field = ENVIRONMENT[variable][0]
    expected = 9930.5 if variable == "BUS_EVENTS_LISTENER_RETRY_MAX" else 5400
    assert getattr(settings, field) == expected


@pytest.mark.parametrize("variable", DURATIONS)
@pytest.mark.parametrize("text", ["5x", "1h30", "-1s", ""])
def test_a_malformed_duration_variable_is_a_start_up_error_naming_it(variable, text):
    with pytest.raises(ConfigError, match=f"^{variable}: "):
        load_settings(env(**{variable: text}))


def test_an_empty_text_variable_is_unset():
    settings = load_settings(env(BUS_EVENTS_API_URL="", BUS_CONTAINERS_STATE_URL="", BUS_CONTAINERS_METRICS_ADDR=""))
    assert (settings.events_url, settings.state_url, settings.metrics_addr) == (None, None, None)
