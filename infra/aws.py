"""The only module that imports boto3.

It owns the session (region, profile, the standard credential chain and $AWS_ENDPOINT_URL), retries
the named transient errors with backoff, and turns every AWS failure into one line that says what
to do. Everything above it deals in plain dicts and CloudError.
"""

from __future__ import annotations

import random
import time
from typing import Any, Callable

import boto3
from botocore.config import Config
from botocore.parsers import ResponseParserError
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    NoRegionError,
    PartialCredentialsError,
    ProfileNotFound,
    WaiterError,
)

from infra.errors import UserError

# Retried with exponential backoff; anything else is raised at once.
TRANSIENT_CODES = {
    "RequestLimitExceeded", "Throttling", "ThrottlingException", "TooManyRequestsException",
    "InternalError", "InternalFailure", "ServiceUnavailable", "Unavailable", "RequestTimeout",
}
MAX_ATTEMPTS = 6

NO_CREDENTIALS = ("no AWS credentials found: run `aws configure`, set AWS_PROFILE or --profile, "
                  "or export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")


class CloudError(UserError):
    """An AWS failure, already reduced to one actionable line. `code` is AWS's error code."""

    def __init__(self, message: str, code: str = ""):
        super().__init__(message)
        self.code = code


def explain(code: str, message: str, operation: str) -> str:
    """AWS error code -> what the user should do about it."""
    if code in ("UnauthorizedOperation", "AccessDenied", "AccessDeniedException"):
        return (f"AWS denied {operation} ({code}): give your IAM identity the permissions listed in the "
                f"README's 'Cloud' section")
    if code == "VcpuLimitExceeded":
        return ("your vCPU quota for this instance family is too low in this region: request an increase in "
                "Service Quotas (EC2 'Running On-Demand G and VT instances' for g4dn/g5/g6), or pick a smaller type")
    if code == "MaxSpotInstanceCountExceeded":
        return "your spot instance quota is exhausted in this region: request an increase, or launch without --spot"
    if code in ("AuthFailure", "InvalidClientTokenId", "UnrecognizedClientException", "SignatureDoesNotMatch"):
        return f"AWS rejected the credentials ({code}): check `aws sts get-caller-identity` and your profile"
    if code.startswith("InvalidAMIID"):
        return f"{message} (--ami must be an AMI id in this region)"
    if code == "InvalidKeyPair.NotFound":
        return f"{message}: create it, or drop --key-name to let mnist-cloud make one"
    return f"AWS {operation} failed: {code}: {message}"


class Aws:
    """A boto3 session plus retrying, error-translating calls."""

    def __init__(self, region: str | None = None, profile: str | None = None, sleep: Callable = time.sleep):
        try:
            self.session = boto3.Session(profile_name=profile, region_name=region)
        except ProfileNotFound:
            raise UserError(f"AWS profile {profile!r} not found; list them with `aws configure list-profiles`") from None
        self.region = self.session.region_name
        if not self.region:
            raise UserError("no AWS region: pass --region (e.g. --region us-east-1) or set AWS_DEFAULT_REGION")
        known = set()
        for partition in ("aws", "aws-cn", "aws-us-gov"):
            known.update(self.session.get_available_regions("ec2", partition_name=partition))
        if self.region not in known:
            sample = ", ".join(sorted(r for r in known if r.startswith(("us-", "eu-")))[:6])
            raise UserError(f"unknown AWS region {self.region!r}; use one like {sample}")
        try:
            credentials = self.session.get_credentials()
        except (PartialCredentialsError, BotoCoreError) as e:
            raise UserError(f"AWS credentials are incomplete ({e}); {NO_CREDENTIALS}") from None
        if credentials is None:
            raise UserError(NO_CREDENTIALS)
        self._sleep = sleep
        self._clients: dict[str, Any] = {}
        # botocore's own retries are off: we retry exactly the transient codes, with our backoff.
        self._config = Config(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=10, read_timeout=60)

    def client(self, service: str):
        if service not in self._clients:
            self._clients[service] = self.session.client(service, config=self._config)
        return self._clients[service]

    def call(self, service: str, operation: str, **kwargs) -> dict:
        """client.<operation>(**kwargs), retrying transient errors; raises CloudError otherwise."""
        method = getattr(self.client(service), operation)
        return self.retrying(lambda: method(**kwargs), f"{service}:{operation}")

    def retrying(self, fn: Callable[[], Any], operation: str) -> Any:
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                return fn()
            except ClientError as e:
                code = e.response.get("Error", {}).get("Code", "")
                message = e.response.get("Error", {}).get("Message", str(e))
                if code in TRANSIENT_CODES and attempt < MAX_ATTEMPTS:
                    self._sleep(min(20.0, 0.5 * 2 ** (attempt - 1)) * (0.5 + random.random()))
                    continue
                raise CloudError(explain(code, message, operation), code) from None
            except NoCredentialsError:
                raise UserError(NO_CREDENTIALS) from None
            except NoRegionError:
                raise UserError("no AWS region: pass --region or set AWS_DEFAULT_REGION") from None
            except EndpointConnectionError as e:
                raise CloudError(f"cannot reach AWS at {e.kwargs.get('endpoint_url')}: check the network "
                                 "and --region", "EndpointConnectionError") from None
            except (BotoCoreError, ResponseParserError) as e:  # e.g. an answer botocore cannot parse
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise CloudError(f"AWS {operation} failed: {first}", type(e).__name__) from None
        raise AssertionError("unreachable")

    def paginate(self, service: str, operation: str, key: str, **kwargs) -> list:
        """Every item under `key` across all pages."""
        paginator = self.client(service).get_paginator(operation)

        def collect():
            return [item for page in paginator.paginate(**kwargs) for item in page.get(key, [])]

        return self.retrying(collect, f"{service}:{operation}")

    def wait(self, service: str, waiter: str, what: str, delay: int = 5, max_attempts: int = 120, **kwargs) -> None:
        """A boto3 waiter, with a one-line error when it gives up."""
        try:
            self.client(service).get_waiter(waiter).wait(WaiterConfig={"Delay": delay, "MaxAttempts": max_attempts},
                                                         **kwargs)
        except WaiterError as e:
            raise CloudError(f"gave up waiting for {what} ({e.last_response.get('Error', {}).get('Message') or e})",
                             "WaiterError") from None
