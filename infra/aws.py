"""The only module that imports boto3.

It owns the session (region, profile, the standard credential chain and $AWS_ENDPOINT_URL), lets
botocore's `standard` retry mode retry throttling and transient failures, and turns every AWS failure
into one line that says what to do. Everything above it deals in plain dicts and CloudError.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

import boto3
import botocore.session
from botocore.config import Config
from botocore.credentials import JSONFileCache
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    NoRegionError,
    PartialCredentialsError,
    ProfileNotFound,
    SSOTokenLoadError,
    TokenRetrievalError,
    UnauthorizedSSOTokenError,
)
from botocore.parsers import ResponseParserError

from infra.errors import UserError
from infra.poll import poll

T = TypeVar("T")

# Total attempts per call (the first one included), unless AWS_MAX_ATTEMPTS or the profile's
# max_attempts says otherwise. botocore's client-config `max_attempts` would count retries only.
MAX_ATTEMPTS = 6
# Codes that may go away by themselves: a wait polls again on them (after botocore's own retries gave up).
TRANSIENT_CODES = {
    "RequestLimitExceeded", "Throttling", "ThrottlingException", "TooManyRequestsException",
    "InternalError", "InternalFailure", "ServiceUnavailable", "Unavailable", "RequestTimeout",
}
# Not transient: ExpiredToken, ExpiredTokenException, RequestExpired. Asking again gets the same answer
# until the user logs in again (refreshable credentials, an assumed role's, renew before they expire).
# botocore's SSO failures, raised at the first signed call, not when the session is made
SSO_ERRORS = (UnauthorizedSSOTokenError, SSOTokenLoadError, TokenRetrievalError)
# the AWS CLI's cache of assumed-role credentials: one MFA code serves both tools until they expire
CLI_CREDENTIAL_CACHE = os.path.join("~", ".aws", "cli", "cache")
# EC2 is eventually consistent: a group or key pair we have just created can be "not found" for a few seconds.
SETTLE_SECONDS = 30.0

NO_CREDENTIALS = ("no AWS credentials found: run `aws configure`, set AWS_PROFILE or --profile, "
                  "or export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")


class CloudError(UserError):
    """An AWS failure, already reduced to one actionable line. `code` is AWS's error code (or botocore's
    exception name); `transient` says whether asking again later may succeed."""

    def __init__(self, message: str, code: str = "", transient: bool = False, detail: str = ""):
        super().__init__(message)
        self.code = code
        self.transient = transient
        self.detail = detail  # AWS's own message (e.g. which action an UnauthorizedOperation denied)


def refresh_hint(profile: str | None) -> str:
    login = f"`aws sso login --profile {profile}`" if profile else "`aws sso login`"
    return f"log in again ({login} for an SSO profile) or export fresh temporary credentials"


def explain(code: str, message: str, operation: str, region: str | None = None, profile: str | None = None) -> str:
    """AWS error code -> what the user should do about it."""
    if code in ("ExpiredToken", "ExpiredTokenException"):
        return f"your AWS session credentials have expired ({code}): {refresh_hint(profile)}, then run the command again"
    if code == "RequestExpired":
        return (f"AWS refused {operation} as expired (RequestExpired): this computer's clock may be off (compare "
                f"`date -u` with the real time and sync it), or the session credentials expired: {refresh_hint(profile)}")
    if code == "OptInRequired":
        return (f"region {region} is not enabled for this AWS account (OptInRequired): enable it in the console "
                "(Account > AWS Regions), or pick another --region")
    if code in ("UnauthorizedOperation", "AccessDenied", "AccessDeniedException"):
        return (f"AWS denied {operation} ({code}): give your IAM identity the permissions listed in the "
                "docs/cloud.md#iam-permissions")
    if code == "VcpuLimitExceeded":
        return ("your vCPU quota for this instance family is too low in this region: request an increase in "
                "Service Quotas (EC2 'Running On-Demand G and VT instances' for g4dn/g5/g6), or pick a smaller type")
    if code == "MaxSpotInstanceCountExceeded":
        return "your spot instance quota is exhausted in this region: request an increase, or launch without --spot"
    if code in ("AuthFailure", "InvalidClientTokenId", "UnrecognizedClientException", "SignatureDoesNotMatch"):
        opt_in = (f"; if {region} is an opt-in region, enable it for this account (Account > AWS Regions) or pick "
                  "another --region" if code == "AuthFailure" and region else "")
        return f"AWS rejected the credentials ({code}): check `aws sts get-caller-identity` and your profile{opt_in}"
    if code.startswith("InvalidAMIID"):
        return f"{message} (--ami must be an AMI id in this region)"
    if code == "InvalidKeyPair.NotFound":
        return f"{message}: create it, or drop --key-name to let mnist-cloud make one"
    if code in ("RequestLimitExceeded", "Throttling", "ThrottlingException", "TooManyRequestsException"):
        return (f"AWS throttled {operation} ({code}) through every retry: wait a minute and run the command "
                "again; it picks up where it stopped")
    return f"AWS {operation} failed: {code}: {message}"


def translate(e: Exception, operation: str, region: str | None = None, profile: str | None = None) -> UserError:
    """A boto3/botocore exception -> one line (CloudError, or UserError for missing settings)."""
    if isinstance(e, ClientError):
        code = e.response.get("Error", {}).get("Code", "")
        message = e.response.get("Error", {}).get("Message", str(e))
        return CloudError(explain(code, message, operation, region, profile), code, transient=code in TRANSIENT_CODES,
                          detail=message)
    if isinstance(e, SSO_ERRORS):
        login = f"aws sso login --profile {profile}" if profile else "aws sso login"
        return CloudError(f"your AWS SSO login{f' for profile {profile!r}' if profile else ''} has expired or is "
                          f"missing ({type(e).__name__}): run `{login}`, then the command again", type(e).__name__)
    if isinstance(e, NoCredentialsError):
        return UserError(NO_CREDENTIALS)
    if isinstance(e, NoRegionError):
        return UserError("no AWS region: pass --region or set AWS_DEFAULT_REGION")
    if isinstance(e, EndpointConnectionError):
        return CloudError(f"cannot reach AWS at {e.kwargs.get('endpoint_url')}: check the network and --region",
                          "EndpointConnectionError", transient=True)
    # e.g. a dropped connection, a read timeout, an answer botocore cannot parse
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    return CloudError(f"AWS {operation} failed: {first}", type(e).__name__, transient=True)


_CORE_SESSIONS: dict[tuple, botocore.session.Session] = {}
# what botocore reads from the environment when it resolves credentials and endpoints; a CLI process
# never changes these, a test process does between tests
_SESSION_ENV = ("AWS_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_ENDPOINT_URL",
                "AWS_MAX_ATTEMPTS", "HOME")


def core_session(profile: str | None) -> botocore.session.Session:
    """One botocore session per profile per process: its credentials are resolved (and an MFA code asked
    for) once, whatever the number of Aws objects or regions. An assumed role's credentials are kept in
    the AWS CLI's own cache, so a code typed for either tool serves both until the credentials expire."""
    key = (profile, *(os.environ.get(v) for v in _SESSION_ENV))
    if key not in _CORE_SESSIONS:
        core = botocore.session.Session(profile=profile)
        provider = core.get_component("credential_provider").get_provider("assume-role")
        provider.cache = JSONFileCache(os.path.expanduser(CLI_CREDENTIAL_CACHE))
        _CORE_SESSIONS[key] = core
    return _CORE_SESSIONS[key]


class Aws:
    """A boto3 session plus error-translating calls and deadline-bounded waits. Make one, and its
    clients (`client`), in the main thread: a boto3 session is not thread-safe, its clients are."""

    def __init__(self, region: str | None = None, profile: str | None = None, sleep: Callable = time.sleep,
                 clock: Callable[[], float] = time.monotonic):
        try:
            self.session = boto3.Session(botocore_session=core_session(profile), region_name=region)
        except ProfileNotFound:
            raise UserError(f"AWS profile {profile!r} not found; list them with `aws configure list-profiles`") from None
        self.profile = profile or os.environ.get("AWS_PROFILE")
        self.region = self.session.region_name
        if not self.region:
            raise UserError("no AWS region: pass --region (e.g. --region us-east-1) or set AWS_DEFAULT_REGION")
        # No check of the name against botocore's bundled region list: it lags the real regions. A name
        # that is no region fails at the first call (its endpoint does not resolve), at once (`reached`).
        self.reached = False  # whether any call of this process got an answer: a region that exists
        try:
            credentials = self.session.get_credentials()
        except SSO_ERRORS as e:
            raise translate(e, "sign-in", self.region, self.profile) from None
        except (PartialCredentialsError, BotoCoreError) as e:
            raise UserError(f"AWS credentials are incomplete ({e}); {NO_CREDENTIALS}") from None
        if credentials is None:
            raise UserError(NO_CREDENTIALS)
        self._sleep = sleep
        self._clock = clock
        self._clients: dict[str, Any] = {}
        # botocore's standard mode retries throttling, 5xx and connection errors with jittered backoff and a
        # retry quota; AWS_MAX_ATTEMPTS (or max_attempts in the profile) overrides our number of attempts.
        retries: dict[str, Any] = {"mode": "standard"}
        if self.session._session.get_config_variable("max_attempts") is None:
            retries["total_max_attempts"] = MAX_ATTEMPTS
        self._config = Config(retries=retries, connect_timeout=10, read_timeout=60)

    def client(self, service: str):
        if service not in self._clients:
            # the region named here: boto3 writes a session's region into the botocore session it shares with
            # every Aws of this profile, so the newest Aws's region would otherwise win
            self._clients[service] = self.session.client(service, region_name=self.region, config=self._config)
        return self._clients[service]

    def call(self, service: str, operation: str, settle: tuple[str, ...] = (), **kwargs) -> dict:
        """client.<operation>(**kwargs); raises CloudError. `settle`: error codes that only mean "not visible
        yet" because we have just created the resource; the call is repeated on them for SETTLE_SECONDS."""
        method = getattr(self.client(service), operation)
        name = f"{service}:{operation}"
        if not settle:
            return self.translating(lambda: method(**kwargs), name)

        def attempt():
            try:
                return self.translating(lambda: method(**kwargs), name)
            except CloudError as e:
                if e.code in settle:
                    return None
                raise

        # only the settle codes are asked again: botocore has already spent the call's retries on the rest
        return self._poll(f"{name} to see what was just created", attempt, timeout=SETTLE_SECONDS, delay=2,
                          last=lambda: self.translating(lambda: method(**kwargs), name), poll_on_transient=False)

    def translating(self, fn: Callable[[], T], operation: str) -> T:
        try:
            result = fn()
        except (ClientError, BotoCoreError, ResponseParserError) as e:
            error = translate(e, operation, self.region, self.profile)
            if isinstance(e, EndpointConnectionError) and not self.reached:
                # nothing has answered yet: most likely a region name that is not one (its endpoint does not
                # resolve), or no network at all; neither goes away by polling
                raise CloudError(f"cannot reach AWS at {e.kwargs.get('endpoint_url')}: check --region "
                                 f"({self.region!r}; `aws ec2 describe-regions` lists yours) and the network",
                                 "EndpointConnectionError") from None
            raise error from None
        self.reached = True
        return result

    def paginate(self, service: str, operation: str, key: str, **kwargs) -> list:
        """Every item under `key` across all pages."""
        paginator = self.client(service).get_paginator(operation)

        def collect():
            return [item for page in paginator.paginate(**kwargs) for item in page.get(key, [])]

        return self.translating(collect, f"{service}:{operation}")

    def wait(self, what: str, check: Callable[[], T | None], timeout: float = 600, delay: float = 5) -> T:
        """Call check() every `delay` s until it returns something other than None, and return that.

        A transient CloudError (network, read timeout, throttling, expired token) only means "ask again";
        any other error ends the wait at once. At the deadline, one line says what we were waiting for."""
        return self._poll(what, check, timeout, delay)

    def _poll(self, what: str, check: Callable[[], T | None], timeout: float, delay: float,
              last: Callable[[], T] | None = None, poll_on_transient: bool = True) -> T:
        """The one poll loop with a deadline, behind wait() and call(settle=...). `poll_on_transient=False`:
        only check() returning None means "ask again". At the deadline, `last()` gets one final try if given
        (its own error is then the answer)."""
        problem = ""

        def attempt() -> T | None:
            nonlocal problem
            try:
                return check()
            except CloudError as e:
                if not (e.transient and poll_on_transient):
                    raise
                problem = f" (last error: {e})"
                return None

        result = poll(attempt, timeout, interval=delay, clock=self._clock, sleep=self._sleep)
        if result is not None:
            return result
        if last is not None:
            return last()
        raise CloudError(f"gave up after {timeout:.0f} s waiting for {what}{problem}; run the command again to "
                         "continue", "WaitTimeout")
