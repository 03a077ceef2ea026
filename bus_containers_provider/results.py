"""Run results users can trust (CONTRACT §7): output capped per stream, and one outcome status."""
from .schemas import RUN_STATUSES

SUCCEEDED, FAILED, TIMED_OUT, CANCELLED, ERROR = RUN_STATUSES


def cap(text: str, limit: int):
    """(text cut to at most `limit` UTF-8 bytes on a character boundary, whether it was cut)."""
    if len(text) * 4 <= limit:  # no string of this length can be over the limit
        return text, False
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= limit:
        return text, False
    # A cut inside a character leaves an incomplete sequence at the end only; "ignore" drops it.
    return data[:limit].decode("utf-8", "ignore"), True


def outcome(result: dict) -> str:
    """The integration's status when it is one of ours; else a timeout; else the exit code decides."""
    status = result.get("status")
    if status in RUN_STATUSES:
        return status
    if result.get("timed_out"):
        return TIMED_OUT
    return SUCCEEDED if result["exit_code"] == 0 else FAILED


def settle(result: dict, max_output_bytes: int) -> dict:
    """The answer to the caller: capped output, truncation flags always present, a status always set."""
    settled = {key: value for key, value in result.items() if key != "timed_out"}
    for stream in ("stdout", "stderr"):
        settled[stream], cut = cap(result[stream], max_output_bytes)
        settled[f"{stream}_truncated"] = cut or bool(result.get(f"{stream}_truncated"))
    settled["status"] = outcome(result)
    return settled
