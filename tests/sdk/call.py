"""Calls tollgate through the official Python SDK, unchanged.

Reads one JSON job from argv[1]:
  {"endpoint": "127.0.0.1:port", "secret_id", "secret_key", "action",
   "params": {...}, "version"?, "service"?, "headers"?: {...},
   "parallel"?: n, "clock_offset_s"?: seconds}
and prints one JSON line per call: {"response": ...} on success, or
{"code": ..., "message": ..., "request_id": ...} for the SDK's exception.
"""
import json
import sys
import time
import threading

from tencentcloud.common import credential
from tencentcloud.common.common_client import CommonClient
from tencentcloud.common.exception.tencent_cloud_sdk_exception import TencentCloudSDKException
from tencentcloud.common.profile.client_profile import ClientProfile
from tencentcloud.common.profile.http_profile import HttpProfile

job = json.loads(sys.argv[1])
offset = job.get("clock_offset_s", 0)
if offset:
    real_time = time.time
    time.time = lambda: real_time() + offset

http_profile = HttpProfile(endpoint=job["endpoint"], protocol="http", reqTimeout=60)
client = CommonClient(
    job.get("service", "aiart"),
    job.get("version", "2022-12-29"),
    credential.Credential(job["secret_id"], job["secret_key"]),
    "ap-guangzhou",
    profile=ClientProfile(httpProfile=http_profile),
)

results = [None] * job.get("parallel", 1)


def call(i):
    try:
        results[i] = {"response": client.call_json(job["action"], job["params"], headers=job.get("headers"))}
    except TencentCloudSDKException as e:
        results[i] = {"code": e.get_code(), "message": e.get_message(), "request_id": e.get_request_id()}


threads = [threading.Thread(target=call, args=(i,)) for i in range(len(results))]
for t in threads:
    t.start()
for t in threads:
    t.join()
for r in results:
    print(json.dumps(r))
