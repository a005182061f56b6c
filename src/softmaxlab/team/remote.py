"""`softmaxlab push|pull [DVC ARGS]`: `dvc push` / `dvc pull`, after asking the object store
whether it answers and takes these credentials.

DVC reports a store that is down in one line of its own, but credentials only as botocore
puts them: a wrong key or secret is `403 … HeadObject operation: Forbidden`, none at all is
`Unable to locate credentials`. One request to the remote's bucket (the same endpoint and
credentials DVC would use) tells which variable is wrong; then DVC runs as it would anyway.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

from softmaxlab.core.errors import UserError

SOURCE_HINT = "`source` your env file (.team/users/NAME.env from `softmaxlab team add-user`, or .team/env)"


class StoreDown(Exception):
    """The object store does not answer: not the user's doing, exit 1."""


def default_remote(root: Path) -> tuple[str, dict] | None:
    """(name, settings) of the project's default DVC remote, from DVC's own config (the
    committed .dvc/config merged with .dvc/config.local), or None."""
    from dvc.config import Config

    config = Config(dvc_dir=str(root / ".dvc"))
    name = config["core"].get("remote")
    return (name, dict(config["remote"].get(name, {}))) if name else None


def check_s3(remote: str, settings: dict, write: bool = False) -> None:
    """Raise UserError naming the variable that is missing or wrong, StoreDown if the store
    does not answer; return if the bucket can be listed with these credentials and, with
    `write`, written to (a multipart upload started and aborted: it leaves no object, and a
    READ teammate's key is refused it)."""
    import boto3
    import botocore.exceptions as bx

    url = settings["url"]
    bucket = urlsplit(url).netloc
    endpoint = settings.get("endpointurl") or os.environ.get("AWS_ENDPOINT_URL")
    where = f"DVC remote {remote!r} ({url}" + (f" at {endpoint})" if endpoint else ")")
    # DVC's S3 remote takes keys from its config first, else from boto's usual chain.
    key_name, secret_name = "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"
    if settings.get("access_key_id"):
        key_name, secret_name = "access_key_id (.dvc/config.local)", "secret_access_key (.dvc/config.local)"
    session = boto3.session.Session(
        aws_access_key_id=settings.get("access_key_id"),
        aws_secret_access_key=settings.get("secret_access_key"),
        profile_name=settings.get("profile"),
        region_name=settings.get("region"),
    )
    try:
        creds = session.get_credentials()
    except bx.PartialCredentialsError as err:
        raise UserError(f"{err.kwargs.get('cred_var')} is not set: {where} needs it; {SOURCE_HINT}") from None
    if creds is None:
        raise UserError(f"{key_name} and {secret_name} are not set: {where} needs them; {SOURCE_HINT}")
    s3 = session.client("s3", endpoint_url=endpoint, config=_client_config())
    refused = f"may not use bucket {bucket!r} (AccessDenied)"
    try:
        s3.list_objects_v2(Bucket=bucket, MaxKeys=1)
        if write:
            refused = f"may not write to bucket {bucket!r} (AccessDenied): a READ teammate's key pulls only"
            key = f"{urlsplit(url).path.strip('/')}/.softmaxlab-write-check".lstrip("/")
            upload = s3.create_multipart_upload(Bucket=bucket, Key=key)
            s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload["UploadId"])
    except bx.EndpointConnectionError as err:
        raise StoreDown(f"the object store of {where} is not answering ({err})") from None
    except bx.ClientError as err:
        code = err.response.get("Error", {}).get("Code", "")
        key = creds.access_key[:4] + "…"  # enough to tell which key, not the whole of it
        known = {
            "InvalidAccessKeyId": f"{key_name}={key} is not a key the object store knows",
            "SignatureDoesNotMatch": f"{secret_name} is wrong for {key_name}={key}",
            "AccessDenied": f"{key_name}={key} {refused}",
            "NoSuchBucket": f"bucket {bucket!r} does not exist",
        }
        if code in known:
            raise UserError(f"{known[code]}: {where}; {SOURCE_HINT}") from None
        raise StoreDown(f"the object store of {where} answered {code or err}") from None


def _client_config():
    from botocore.config import Config

    # A store that is down should say so in seconds, not after botocore's retries.
    return Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 2})


def dvc_cli(command: str, args: list[str]) -> None:
    """softmaxlab push|pull [ARGS]: check the default remote, then `dvc <command> ARGS`."""
    from softmaxlab.core.config import project_root

    root = project_root()
    remote = default_remote(root)
    if remote is None:
        raise UserError(
            "no default DVC remote: `softmaxlab team join` (with .team/env sourced) sets the team's, "
            "or `dvc remote add -d NAME URL`"
        )
    name, settings = remote
    if settings.get("url", "").startswith("s3://"):
        try:
            check_s3(name, settings, write=command == "push")
        except StoreDown as err:
            print(
                f"softmaxlab: error: {err}; nothing was {'sent' if command == 'push' else 'changed'}: "
                f"every output stays in DVC's cache; run `softmaxlab {command}` again once it answers",
                file=sys.stderr,
                flush=True,
            )
            sys.exit(1)
    dvc = Path(sys.executable).parent / "dvc"
    sys.exit(subprocess.run([str(dvc) if dvc.exists() else "dvc", command, *args], cwd=root).returncode)


def push_cli(args: list[str]) -> None:
    dvc_cli("push", args)


def pull_cli(args: list[str]) -> None:
    dvc_cli("pull", args)
