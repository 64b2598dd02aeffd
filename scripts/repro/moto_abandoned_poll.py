#!/usr/bin/env python3
"""Minimal reproduction: a long poll whose client went away still takes a
message on the SQS-protocol server (moto), which then stays invisible for the
whole visibility timeout although nobody holds it.

Usage: moto_abandoned_poll.py [endpoint]   (default http://127.0.0.1:5000)
"""
import sys, time, uuid
import boto3
from botocore.config import Config

endpoint = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:5000"
kw = dict(endpoint_url=endpoint, region_name="us-east-1",
          aws_access_key_id="x", aws_secret_access_key="x")
sqs = boto3.client("sqs", **kw)
# A client that gives up on a receive after 2 s, as a client-side operation
# timeout (or a killed process) does, without retrying.
impatient = boto3.client("sqs", config=Config(read_timeout=2, retries={"max_attempts": 1}), **kw)
url = sqs.create_queue(QueueName=f"repro-{uuid.uuid4().hex}")["QueueUrl"]

def depth():
    a = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=[
        "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
    return int(a["ApproximateNumberOfMessages"]), int(a["ApproximateNumberOfMessagesNotVisible"])

try:
    impatient.receive_message(QueueUrl=url, WaitTimeSeconds=20, VisibilityTimeout=60)
    print("unexpected: the receive returned")
except Exception as e:  # ReadTimeoutError: the client went away
    print(f"client gave up its long poll after 2 s: {type(e).__name__}")
sqs.send_message(QueueUrl=url, MessageBody="hello")
print("sent one message; (visible, in flight) =", depth())
time.sleep(2)
print("2 s later:                   (visible, in flight) =", depth())
got = sqs.receive_message(QueueUrl=url, WaitTimeSeconds=3, VisibilityTimeout=60).get("Messages", [])
print(f"a live consumer's 3 s long poll received {len(got)} message(s)")
sqs.delete_queue(QueueUrl=url)
