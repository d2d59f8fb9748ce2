"""An independent Avro implementation's view of the contract, for tests/contract.rs.

Reads the .avsc files of schemas/avro (every released version under history/), computes
their specification fingerprints with fastavro, then for every hex-encoded single-object
record on stdin (one per line): looks its writer schema up by the header's fingerprint,
decodes it, encodes the decoded datum again with fastavro and its own single-object header,
and prints one JSON line: {"schema", "version", "fingerprint", "fields", "reencoded"}.
Fingerprints are printed as the header's eight bytes in hex (little-endian). With the
argument --fingerprints it prints only {"schema", "version", "fingerprint"} per file.
"""
import glob
import io
import json
import os
import sys

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

root = sys.argv[1]
by_fp = {}
listing = []
for path in sorted(glob.glob(os.path.join(root, "history", "*", "v*.avsc"))):
    schema = json.load(open(path))
    fp = fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO")
    name = os.path.basename(os.path.dirname(path))
    version = int(os.path.basename(path)[1:-5])
    listing.append({"schema": name, "version": version, "fingerprint": fp})
    by_fp[fp] = (name, version, fastavro.parse_schema(schema))

if "--fingerprints" in sys.argv:
    for entry in listing:
        print(json.dumps(entry))
    sys.exit(0)

for line in sys.stdin:
    line = line.strip()
    if not line:
        continue
    data = bytes.fromhex(line)
    assert data[:2] == b"\xc3\x01", "not single-object encoded"
    fp = data[2:10].hex()
    if fp not in by_fp:
        print(json.dumps({"fingerprint": fp, "error": "unknown fingerprint"}))
        continue
    name, version, parsed = by_fp[fp]
    # Union branches come back as (name, record), so the writer picks the same branch.
    datum = fastavro.schemaless_reader(io.BytesIO(data[10:]), parsed, None, return_record_name=True)
    out = io.BytesIO()
    out.write(b"\xc3\x01" + bytes.fromhex(fp))
    fastavro.schemaless_writer(out, parsed, datum)
    print(json.dumps({"schema": name, "version": version, "fingerprint": fp,
                      "fields": sorted(datum.keys()), "reencoded": out.getvalue().hex()}))
