"""The contracts in docs/ against the code: each table of docs/client-protocol.md and docs/redo-child-protocol.md
that states a size, an offset, a code or a field is read here and compared with the constants and functions of the
modules that own them. A change on either side alone fails."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest

from walredod import pg15, protocol
from walredod.config import DaemonSettings, Settings
from walredod.engine import pipe
from walredod.errors import REDO_CHILD_SQLSTATES
from walredod.ingest import UPDATE_OPS, VISIBILITY_MAP_CLEARS
from walredod.native import synthesized
from walredod.objects import RELMAP_FILE_SIZE, base_image_size
from walredod.types import BufferTag
from walredod.walformat import LAYOUTS

ROOT = Path(__file__).resolve().parent.parent
CLIENT_PROTOCOL = ROOT / "docs" / "client-protocol.md"
CHILD_PROTOCOL = ROOT / "docs" / "redo-child-protocol.md"


def table_after(path: Path, heading: str, occurrence: int = 0) -> list[dict[str, str]]:
    """The rows (column title -> cell, backticks kept) of the ``occurrence``-th table after the markdown heading
    ``heading`` (its text without the #s), before the next heading."""
    lines = path.read_text().splitlines()
    starts = [i for i, line in enumerate(lines) if re.fullmatch(rf"#+ {re.escape(heading)}", line.strip())]
    assert len(starts) == 1, f"{path.name}: heading {heading!r} found {len(starts)} times"
    tables, current = [], []
    for line in lines[starts[0] + 1:]:
        if line.startswith("#"):
            break
        if line.startswith("|"):
            current.append([cell.strip() for cell in line.strip().strip("|").split("|")])
        elif current:
            tables.append(current)
            current = []
    if current:
        tables.append(current)
    assert len(tables) > occurrence, f"{path.name}: no table {occurrence} under {heading!r}"
    titles, separator, *rows = tables[occurrence]
    assert all(set(cell) <= set("-: ") for cell in separator), f"{path.name}: {heading!r} table has no separator"
    assert rows, f"{path.name}: {heading!r} table is empty"
    for row in rows:
        assert len(row) == len(titles), f"{path.name}: {heading!r} row {row} has {len(row)} cells"
    return [dict(zip(titles, row)) for row in rows]


def number(cell: str) -> int:
    """The first integer of a cell: decimal with thousands commas, or 0x hex."""
    match = re.search(r"0x[0-9A-Fa-f]+|\d[\d,]*", cell)
    assert match, f"no number in {cell!r}"
    text = match.group(0)
    return int(text, 16) if text.startswith("0x") else int(text.replace(",", ""))


def plain(cell: str) -> str:
    return cell.replace("`", "").strip()


# --- client protocol: frames and headers -----------------------------------------------------------------------------

def test_request_and_reply_frames_give_the_header_sizes():
    request = {row["frame"]: row for row in table_after(CLIENT_PROTOCOL, "Request frames")}
    reply = {row["frame"]: row for row in table_after(CLIENT_PROTOCOL, "Reply frames")}
    assert number(request["1"]["size"]) == protocol.REQUEST_HEADER.size
    assert number(reply["1"]["size"]) == protocol.REPLY_HEADER.size
    assert request["0"]["size"] == reply["0"]["size"] == "0"


@pytest.mark.parametrize("heading, fields", [("Request header", protocol.REQUEST_FIELDS),
                                             ("Reply header", protocol.REPLY_FIELDS)])
def test_header_field_tables(heading, fields):
    """Offsets and sizes, row by row, are the header's struct layout; the rows tile the header with no gap."""
    rows = table_after(CLIENT_PROTOCOL, heading)
    documented = [(number(row["offset"]), number(row["size"])) for row in rows]
    assert documented == [(offset, size) for _name, offset, size in protocol.field_offsets(fields)]
    offset = 0
    for row_offset, size in documented:
        assert row_offset == offset
        offset += size
    assert offset == struct.calcsize(">" + "".join(code for _, code in fields))


def test_header_sizes_in_the_text():
    text = CLIENT_PROTOCOL.read_text()
    assert f"Frame 1, {protocol.REQUEST_HEADER.size} bytes" in text
    assert f"the {protocol.REQUEST_HEADER.size}-byte header" in text


def test_request_kinds():
    rows = table_after(CLIENT_PROTOCOL, "Request kinds")
    documented = {number(row["kind"]): row["request"] for row in rows}
    constants = {value: name[len("KIND_"):].lower() for name, value in vars(protocol).items()
                 if name.startswith("KIND_")}
    assert documented == constants
    control = {number(row["kind"]) for row in rows if row["frames"] == "delimiter and header only"}
    assert control == set(protocol.CONTROL_KINDS)


def _header(kind: int, object_kind: int, fork: int, spcnode: int, dbnode: int, relnode: int, block: int) -> bytes:
    return protocol.REQUEST_HEADER.pack(protocol.MAGIC, protocol.VERSION, kind, 1, 0, 0, object_kind, fork,
                                        spcnode, dbnode, relnode, block)


def _decoded_tag(object_kind: int, fields: dict[str, int]):
    header = _header(protocol.KIND_REDO, object_kind, fields["fork"], fields["spcnode"], fields["dbnode"],
                     fields["relfilenode"], fields["block"])
    return protocol.decode_request([b"", header, b"", b""]).tag


SAMPLE_FIELDS = {"fork": 2, "spcnode": 1663, "dbnode": 16385, "relfilenode": 24576, "block": 70_001}


def test_object_kinds_and_their_base_images():
    rows = table_after(CLIENT_PROTOCOL, "Object kinds")
    constants = {value for name, value in vars(protocol).items() if name.startswith("OBJECT_")}
    assert {number(row["kind"]) for row in rows} == constants
    for row in rows:
        size = None if row["base image"] == "any" else number(row["base image"])
        assert base_image_size(_decoded_tag(number(row["kind"]), SAMPLE_FIELDS)) == size, row


def _key_word(cell: str, fields: dict[str, int]) -> int:
    """A routing-key cell: a header field's name, a constant, or ``field / divisor``."""
    cell = plain(cell)
    if "/" in cell:
        left, right = (part.strip() for part in cell.split("/"))
        return _key_word(left, fields) // int(right)
    if cell in fields:
        return fields[cell]
    return number(cell)


@pytest.mark.parametrize("fields", [SAMPLE_FIELDS, {"fork": 0, "spcnode": 1664, "dbnode": 0, "relfilenode": 1262,
                                                    "block": 31}])
def test_routing_keys(fields):
    rows = table_after(CLIENT_PROTOCOL, "Which worker")
    assert {number(row["object kind"]) for row in rows} == {
        value for name, value in vars(protocol).items() if name.startswith("OBJECT_")}
    for row in rows:
        documented = tuple(_key_word(row[f"key word {i}"], fields) for i in (1, 2, 3))
        assert protocol.routing_key(_decoded_tag(number(row["object kind"]), fields)) == documented, row


def test_status_codes():
    rows = table_after(CLIENT_PROTOCOL, "Status codes")
    documented = {number(row["status"]): row["name"] for row in rows}
    assert documented == {protocol.STATUS_OK: "ok", **protocol.STATUS_NAMES}


def test_limits():
    rows = {row["limit"]: row["value"] for row in table_after(CLIENT_PROTOCOL, "Limits")}
    assert number(rows["request header"]) == protocol.REQUEST_HEADER.size
    assert number(rows["reply header"]) == protocol.REPLY_HEADER.size
    assert number(rows["relation and SLRU page"]) == pg15.BLCKSZ
    assert number(rows["relation-map file"]) == RELMAP_FILE_SIZE
    assert number(rows["records in one request"]) == protocol.MAX_RECORDS
    assert number(rows["requests in one batch"]) == protocol.MAX_BATCH
    assert number(rows["relation page block numbers"]) == pg15.MAX_BLOCK_NUMBER
    settings = [row for row in rows.values() if row.startswith("`daemon.")]
    assert len(settings) == 4
    for cell in settings:
        name, value = re.fullmatch(r"`daemon\.(\w+)`, ([\d,]+) .*by default", cell).groups()
        assert DaemonSettings.model_fields[name].default == int(value.replace(",", "")), cell


# --- synthesized records --------------------------------------------------------------------------------------------

def test_synthesized_record_types():
    rows = table_after(CLIENT_PROTOCOL, "Synthesized record types")
    assert {number(row["type"]): row["record"] for row in rows} == {
        type_id: cls.name for type_id, cls in synthesized.SYNTHESIZED.items()}
    assert "`WRSY`" in CLIENT_PROTOCOL.read_text() and synthesized.MAGIC == b"WRSY"


def test_visibility_map_clears():
    """The heap records a pageserver must turn into type-1 records are the ones walredod.ingest turns."""
    rmgr_ids = {"Heap": pg15.RM_HEAP_ID, "Heap2": pg15.RM_HEAP2_ID}
    single, update = {}, set()
    for row in table_after(CLIENT_PROTOCOL, "Visibility-map bits heap records clear"):
        name, rmid = re.fullmatch(r"(\w+) \((\d+)\)", row["resource manager"]).groups()
        assert rmgr_ids[name] == int(rmid)
        ops = tuple(int(op, 16) for op in re.findall(r"\((0x[0-9A-Fa-f]+)\)", row["record"]))
        rule = (number(row["flags byte at"]), number(row["bit tested"]), number(row["bits cleared"]))
        if len(ops) == 1:
            assert row["heap block of"] == "block 0"
            single[(int(rmid), ops[0])] = rule
        else:
            assert int(rmid) == pg15.RM_HEAP_ID and rule[0] == 7 and rule[2] == 3
            update.add((ops, rule[1], row["heap block of"]))
    assert single == VISIBILITY_MAP_CLEARS
    neon_delete_flags = LAYOUTS["neon"].delete_flags
    assert LAYOUTS["vanilla"].delete_flags == single[(pg15.RM_HEAP_ID, pg15.XLOG_HEAP_DELETE)][0]
    assert f"DELETE and LOCK is at byte {neon_delete_flags} of the main data" in CLIENT_PROTOCOL.read_text()
    assert update == {(UPDATE_OPS, 0x01, "block 1 (block 0 when absent)"), (UPDATE_OPS, 0x02, "block 0")}


# --- control requests: the status and directory documents ------------------------------------------------------------

@pytest.fixture
def supervisor(tmp_path):
    """The supervisor's bookkeeping (it writes both documents), one slot, no sockets or processes."""
    from walredod.daemon.pool import Pool, Slot

    settings = Settings.model_validate({"daemon": {"endpoints": [f"ipc://{tmp_path}/walredod.sock"]},
                                        "engine": {"data_dir": str(tmp_path / "data")}})
    pool = Pool(settings, start_process=None, send_worker=None, direct_base=f"ipc://{tmp_path}/walredod-worker")
    pool.slots[0] = Slot(0, direct_endpoint=f"{pool.direct_base}-0.sock")
    return pool


def _fields(heading: str, occurrence: int) -> set[str]:
    return {plain(row["field"]) for row in table_after(CLIENT_PROTOCOL, heading, occurrence)}


def test_status_document_fields(supervisor):
    status = json.loads(supervisor.status_json())
    assert set(status) == _fields("Status document", 0)
    assert set(status["workers"][0]) == _fields("Status document", 1)
    states = re.findall(r"`(\w+)` \(", next(row["meaning"] for row in table_after(CLIENT_PROTOCOL, "Status document",
                                                                                    1) if row["field"] == "`state`"))
    assert status["workers"][0]["state"] in states and len(states) == 5


def test_directory_fields(supervisor):
    directory = json.loads(supervisor.directory_json(local=True))
    assert set(directory) == _fields("Directory", 0)
    assert set(directory["workers"][0]) == _fields("Directory", 1)


# --- the redo-child protocol -----------------------------------------------------------------------------------------

def test_sqlstate_table_is_the_code_table():
    rows = table_after(CHILD_PROTOCOL, "Errors")
    documented = {plain(row["SQLSTATE"]): (plain(row["errcode in C"]), plain(row["engine error"])) for row in rows}
    assert documented == {code: (state.errcode, state.error.__name__) for code, state in REDO_CHILD_SQLSTATES.items()}
    extension = "".join(source.read_text() for source in sorted((ROOT / "pgext").glob("*.c")))
    for state in REDO_CHILD_SQLSTATES.values():
        assert f"errcode({state.errcode})" in extension, f"the extension never raises {state.errcode}"


def test_block_tag_table():
    """The pipe protocol's block tag: fork first, then the four u32 of the relation and block, as encode_tag packs."""
    rows = table_after(CHILD_PROTOCOL, "Framing")
    layout, offset = [], 0
    for code in pipe._TAG.format.lstrip("<>!="):
        layout.append((offset, struct.calcsize(">" + code)))
        offset += layout[-1][1]
    assert [(number(row["offset"]), number(row["size"])) for row in rows] == layout
    assert pipe.TAG_LEN == offset
    tag = BufferTag(1663, 5, 16384, 1, 9)
    assert struct.unpack(">BIIII", pipe.encode_tag(tag)) == (tag.forknum, tag.spcnode, tag.dbnode, tag.relnode,
                                                             tag.blkno)
    assert [plain(row["field"]).split(" ")[0] for row in rows] == ["fork", "tablespace", "database", "relfilenode",
                                                                    "block"]
