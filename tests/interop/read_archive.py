"""Reads one of Loom's encrypted archive files with pyarrow, as a data team would: Parquet modular
encryption resolved by pyarrow's CryptoFactory and a KmsClient that asks Loom's key service
(`POST /admin/kms/unwrap`) to unwrap each file key.

usage: read_archive.py MODE FILE BASE_URL ADMIN_TOKEN
  MODE full      every column, keys from the key service
       metadata  every column but `record`; the client refuses to unwrap the records key
       none      no key service at all (the client refuses everything)
Prints one JSON line: {"rows", "columns", "event_types", "tenants"} or {"error"}.
"""

import base64
import json
import sys
import urllib.error
import urllib.request

import pyarrow.parquet as pq
import pyarrow.parquet.encryption as pe


class LoomKms(pe.KmsClient):
    def __init__(self, base_url, token, refuse):
        pe.KmsClient.__init__(self)
        self.base_url = base_url
        self.token = token
        self.refuse = refuse

    def wrap_key(self, key_bytes, master_key_identifier):
        raise NotImplementedError("Loom writes its archive itself")

    def unwrap_key(self, wrapped_key, master_key_identifier):
        purpose = master_key_identifier.rsplit(":", 1)[-1]
        if "all" in self.refuse or purpose in self.refuse:
            raise PermissionError(f"no access to {master_key_identifier}")
        body = json.dumps(
            {"master_key_id": master_key_identifier, "wrapped_key": wrapped_key}
        ).encode()
        request = urllib.request.Request(
            self.base_url + "/admin/kms/unwrap",
            data=body,
            headers={
                "Authorization": "Bearer " + self.token,
                "Content-Type": "application/json",
            },
        )
        try:
            with urllib.request.urlopen(request) as response:
                return base64.b64decode(json.load(response)["key"])
        except urllib.error.HTTPError as error:
            raise PermissionError(f"{error.code}: {error.read().decode()}") from error


def main():
    mode, path, base_url, token = sys.argv[1:5]
    refuse = {"full": set(), "metadata": {"records"}, "none": {"all"}}[mode]
    factory = pe.CryptoFactory(lambda config: LoomKms(base_url, token, refuse))
    properties = factory.file_decryption_properties(
        pe.KmsConnectionConfig(), pe.DecryptionConfiguration(cache_lifetime=1)
    )
    try:
        schema = pq.read_schema(path, decryption_properties=properties)
        columns = [name for name in schema.names if mode == "full" or name != "record"]
        # The whole archive reads as one dataset (`tenant_id` and `date` come from the paths);
        # this reads one file.
        table = pq.ParquetFile(path, decryption_properties=properties).read(columns=columns)
    except Exception as error:  # what a reader without the keys gets
        print(json.dumps({"error": f"{type(error).__name__}: {error}"}))
        return
    print(
        json.dumps(
            {
                "rows": table.num_rows,
                "columns": table.column_names,
                "event_types": sorted(set(table.column("event_type").to_pylist())),
                "tenants": sorted(set(table.column("envelope_tenant_id").to_pylist())),
                "records": sum(1 for r in table.column("record").to_pylist() if r)
                if "record" in table.column_names
                else 0,
            }
        )
    )


if __name__ == "__main__":
    main()
