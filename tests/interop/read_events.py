"""Reads Loom events with fastavro, an Avro implementation independent of Loom's own.

usage: read_events.py SCHEMA_DIR EVENTS_FILE

EVENTS_FILE holds one hex-encoded event per line, in Avro single-object encoding. Each event is
matched to its writer schema by the CRC-64-AVRO fingerprint in its header, decoded, and printed as
one JSON line: {"fingerprint", "event_type", "schema_version", "event_id", "tenant_id", "payload"}.
Bytes are printed as hex, UUIDs as strings, timestamps as microseconds since the epoch.
"""

import datetime
import glob
import io
import json
import os
import sys
import uuid

from fastavro import schemaless_reader
from fastavro.schema import fingerprint, parse_schema, to_parsing_canonical_form


EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


def jsonable(value):
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime.datetime):
        # timestamp-micros, back to the number on the wire.
        return (value - EPOCH) // datetime.timedelta(microseconds=1)
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    return value


def main(schema_dir, events_file):
    schemas = {}
    for path in sorted(glob.glob(os.path.join(schema_dir, "*.avsc"))):
        with open(path) as f:
            schema = parse_schema(json.load(f), _write_hint=False)
        schemas[fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO")] = schema
    with open(events_file) as f:
        for line in f:
            data = bytes.fromhex(line.strip())
            if data[:2] != b"\xc3\x01":
                raise SystemExit(f"not single-object encoded: {data[:2].hex()}")
            # The header carries the fingerprint's 8 bytes little-endian, the order fastavro prints.
            fp = data[2:10].hex()
            if fp not in schemas:
                raise SystemExit(f"no schema with fingerprint {fp}")
            record = schemaless_reader(io.BytesIO(data[10:]), schemas[fp], return_record_name=False)
            envelope = record["envelope"]
            print(json.dumps({
                "fingerprint": fp,
                "event_type": envelope["event_type"],
                "schema_version": envelope["schema_version"],
                "event_id": str(envelope["event_id"]),
                "tenant_id": str(envelope["tenant_id"]),
                "payload": jsonable(record["payload"]),
            }, default=str))


if __name__ == "__main__":
    main(*sys.argv[1:])
