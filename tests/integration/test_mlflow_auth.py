"""The registry behind MLflow's basic-auth app (``MLflowServer(admin_password=…)``, what ``k8s/`` and ``wysiwyc stack``
run): a real ``mlflow server --app-name basic-auth`` on 127.0.0.1. Nobody unauthenticated gets in; with the default
permission NO_PERMISSIONS an identity without a grant cannot even read a model; a reader identity (serve, attribute)
reads but cannot move an alias; the promoter, who registered the model and so MANAGEs it, can. The gate runs in the
client: these permissions are what enforce who may move ``@champion``."""

from __future__ import annotations

import os
import secrets

import pytest
from conftest import environ, http_status

from pipeline.stack import MLflowServer
from pipeline.tracking import current_user

pytestmark = pytest.mark.s3


@pytest.fixture(scope="module")
def server(s3_server, tmp_path_factory):
    admin = secrets.token_urlsafe(18)
    root = tmp_path_factory.mktemp("mlflow-auth")
    with MLflowServer(root, s3_server.make_bucket("mlflowauth"), s3_env=s3_server.env, admin_password=admin) as started:
        yield started, admin, root


def _as(user: str, password: str):
    return environ({"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password})


def test_only_granted_identities_reach_the_registry_and_only_the_promoter_moves_an_alias(server):
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client
    from mlflow.tracking import MlflowClient

    started, admin, root = server
    session_user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    search = f"{started.uri}/api/2.0/mlflow/registered-models/search"
    assert http_status(search) == 401  # unauthenticated
    assert http_status(search, ("admin", admin)) == 200
    assert http_status(search, ("admin", "password1234")) == 401  # MLflow's old default admin password
    # the password is in no file of the server's (its config has none; its log does not echo it)
    assert admin not in (root / "basic_auth.ini").read_text() and admin not in started.log_tail(100_000)
    users = {
        "promoter": secrets.token_urlsafe(12),
        "reader": secrets.token_urlsafe(12),
        "nobody": secrets.token_urlsafe(12),
    }
    with _as("admin", admin):
        accounts = get_app_client("basic-auth", tracking_uri=started.uri)
        for name, password in users.items():
            accounts.create_user(name, password)
    client = MlflowClient(started.uri, started.uri)
    with _as("promoter", users["promoter"]):
        assert current_user() == "promoter"  # what promote records as promoted_by
        client.create_registered_model("expl")  # its creator MANAGEs it
        version = client.create_model_version("expl", "s3://mlflowauth/expl/1").version
        client.set_registered_model_alias("expl", "candidate", version)
    with _as("admin", admin):
        accounts.grant_user_permission("reader", "registered_model", "expl", "READ")
    with _as("reader", users["reader"]):
        assert client.get_registered_model("expl").aliases == {"candidate": version}  # serve / attribute resolve it
        with pytest.raises(MlflowException, match="403|PERMISSION_DENIED|Permission denied"):
            client.set_registered_model_alias("expl", "champion", version)
    with _as("nobody", users["nobody"]), pytest.raises(MlflowException, match="403|PERMISSION_DENIED"):
        client.get_registered_model("expl")  # NO_PERMISSIONS by default: not even reading
    with _as("promoter", users["promoter"]):
        client.set_registered_model_alias("expl", "champion", version)
        assert client.get_registered_model("expl").aliases == {"candidate": version, "champion": version}
    assert os.environ.get("MLFLOW_TRACKING_USERNAME") == session_user  # the identities were this test's alone
    assert "default_permission = NO_PERMISSIONS" in (root / "basic_auth.ini").read_text()
