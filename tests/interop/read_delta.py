"""Reads a Delta table `loom export` wrote, as a data team would: delta-rs's Python package
(`deltalake`) opens it, DuckDB queries it over Arrow. Prints JSON on stdout:
{"version": …, "files": …, "columns": [...], "rows": [...]} with the rows of the query given
(default: every row), bytes as hex and timestamps as ISO 8601.

usage: read_delta.py TABLE_URI [SQL over `events`] [STORAGE_OPTIONS_JSON]
"""

import datetime
import json
import sys

import duckdb
from deltalake import DeltaTable


def plain(value):
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, (datetime.datetime, datetime.date)):
        return value.isoformat()
    return value


def main():
    uri = sys.argv[1]
    query = sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] else "SELECT * FROM events"
    options = json.loads(sys.argv[3]) if len(sys.argv) > 3 else None
    table = DeltaTable(uri, storage_options=options)
    events = table.to_pyarrow_table()
    connection = duckdb.connect()
    connection.register("events", events)
    result = connection.execute(query)
    columns = [column[0] for column in result.description]
    rows = [dict(zip(columns, map(plain, row))) for row in result.fetchall()]
    print(json.dumps({
        "version": table.version(),
        "files": len(table.file_uris()),
        "partition_columns": table.metadata().partition_columns,
        "columns": columns,
        "rows": rows,
    }))


if __name__ == "__main__":
    main()
