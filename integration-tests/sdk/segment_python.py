"""Sends events with Segment's official Python SDK (analytics-python), unchanged apart
from the host: python segment_python.py <host> <write key> <run id>."""
import sys

import analytics

host, write_key, run = sys.argv[1], sys.argv[2], sys.argv[3]
errors = []
analytics.write_key = write_key
analytics.host = host
analytics.gzip = True
analytics.sync_mode = False
analytics.on_error = lambda error, items: errors.append(str(error))

user = f"sdk-user-{run}"
analytics.identify(user, {"email": f"sdk-{run}@example.org", "firstName": "Sdk", "plan": "free"},
                   message_id=f"{run}-identify")
analytics.track(user, "Song Played", {"title": "Bach", "duration_ms": 1234}, message_id=f"{run}-track")
analytics.page(user, "Docs", "Getting started", {"url": "https://example.org/docs"}, message_id=f"{run}-page")
analytics.alias(f"sdk-anon-{run}", user, message_id=f"{run}-alias")
analytics.flush()
analytics.shutdown()
if errors:
    print("\n".join(errors), file=sys.stderr)
    sys.exit(1)
print("sent 4 events")
