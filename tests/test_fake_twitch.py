"""The ``fake_twitch`` fixture of kissbot's pytest plugin: Twitch's OAuth answers, on 127.0.0.1."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from kissbot.fake_twitch import DEVICE_GRANT_TYPE, FakeTwitch


@pytest.fixture
def http() -> httpx.Client:
    with httpx.Client(timeout=10) as client:
        yield client


def validate(http: httpx.Client, twitch: FakeTwitch, access: str) -> httpx.Response:
    return http.get(twitch.validate_url, headers={"Authorization": f"OAuth {access}"})


def refresh(http: httpx.Client, twitch: FakeTwitch, refresh_token: str, **extra: str) -> httpx.Response:
    form = {"client_id": twitch.client_id, "grant_type": "refresh_token", "refresh_token": refresh_token, **extra}
    return http.post(twitch.token_url, data=form)


def test_a_minted_token_validates_with_its_identity_and_expires(fake_twitch, http):
    token = fake_twitch.mint("serda_bot", "1209350837", ["chat:read", "chat:edit"], expires_in=3600)
    answer = validate(http, fake_twitch, token.access_token)
    assert answer.status_code == 200
    assert answer.json() == {
        "client_id": "kissbot-test-client", "login": "serda_bot", "scopes": ["chat:read", "chat:edit"],
        "user_id": "1209350837", "expires_in": 3600,
    }
    fake_twitch.expire(token.access_token)
    expired = validate(http, fake_twitch, token.access_token)
    assert (expired.status_code, expired.json()) == (401, {"status": 401, "message": "invalid access token"})
    assert validate(http, fake_twitch, "never-issued").status_code == 401
    assert fake_twitch.requests["/oauth2/validate"] == 3
    assert token.access_token not in repr(token) and token.refresh_token not in repr(token)


def test_refresh_rotates_and_a_single_use_refresh_token_is_spent(fake_twitch, http):
    fake_twitch.single_use_refresh = True
    token = fake_twitch.mint("serda_bot", "1", ["chat:read"])
    first = refresh(http, fake_twitch, token.refresh_token)
    assert first.status_code == 200
    body = first.json()
    assert set(body) == {"access_token", "expires_in", "refresh_token", "scope", "token_type"}
    assert (body["scope"], body["token_type"], body["expires_in"]) == (["chat:read"], "bearer", 14400)
    assert body["refresh_token"] != token.refresh_token and fake_twitch.is_live(body["access_token"])
    again = refresh(http, fake_twitch, token.refresh_token)
    assert (again.status_code, again.json()) == (400, {"status": 400, "message": "Invalid refresh token"})
    assert fake_twitch.refreshes_per_token() == {token.refresh_token: 2}
    assert fake_twitch.issued == [body["access_token"], body["refresh_token"]]
    assert refresh(http, fake_twitch, body["refresh_token"]).status_code == 200


def test_the_token_endpoint_also_reads_its_form_from_the_query_string(fake_twitch, http):
    # As Twitch does; TwitchIO sends its refresh this way.
    token = fake_twitch.mint("serda_bot", "1", ["chat:read"])
    params = {"client_id": fake_twitch.client_id, "grant_type": "refresh_token", "refresh_token": token.refresh_token}
    answer = http.post(fake_twitch.token_url, params=params)
    assert answer.status_code == 200 and fake_twitch.is_live(answer.json()["access_token"])
    assert fake_twitch.refreshes_per_token() == {token.refresh_token: 1}


def test_reusable_refresh_tokens_revocation_and_client_checks(fake_twitch, http):
    fake_twitch.client_secret = "s3cret"
    token = fake_twitch.mint("serda_bot", "1")
    assert refresh(http, fake_twitch, token.refresh_token, client_secret="s3cret").status_code == 200
    assert refresh(http, fake_twitch, token.refresh_token, client_secret="s3cret").status_code == 200
    wrong = refresh(http, fake_twitch, token.refresh_token, client_secret="nope")
    assert (wrong.status_code, wrong.json()["message"]) == (403, "invalid client secret")
    missing = refresh(http, fake_twitch, token.refresh_token)
    assert (missing.status_code, missing.json()["message"]) == (400, "missing client secret")
    fake_twitch.revoke(token.access_token)
    assert refresh(http, fake_twitch, token.refresh_token, client_secret="s3cret").json()["message"] == (
        "Invalid refresh token"
    )
    assert not fake_twitch.is_live(token.access_token)


def start_device(http: httpx.Client, twitch: FakeTwitch, scopes: str = "chat:read chat:edit") -> dict:
    answer = http.post(twitch.device_url, data={"client_id": twitch.client_id, "scopes": scopes})
    assert answer.status_code == 200
    return answer.json()


def poll(http: httpx.Client, twitch: FakeTwitch, device_code: str) -> httpx.Response:
    form = {"client_id": twitch.client_id, "device_code": device_code, "grant_type": DEVICE_GRANT_TYPE}
    return http.post(twitch.token_url, data=form)


def test_the_device_flow_answers_its_scripted_polls_then_the_humans_decision(fake_twitch, http):
    fake_twitch.device_answers = ["authorization_pending", "slow_down"]
    device = start_device(http, fake_twitch)
    assert set(device) == {"device_code", "expires_in", "interval", "user_code", "verification_uri"}
    assert (device["expires_in"], device["interval"], len(device["user_code"])) == (1800, 5, 8)
    assert device["verification_uri"].endswith(f"/activate?public=true&device-code={device['user_code']}")
    assert fake_twitch.device_user_codes() == [device["user_code"]]
    answers = [poll(http, fake_twitch, device["device_code"]).json()["message"] for _ in range(3)]
    assert answers == ["authorization_pending", "slow_down", "authorization_pending"]
    fake_twitch.login_as("serda_bot", "1209350837")
    tokens = poll(http, fake_twitch, device["device_code"]).json()
    assert tokens["scope"] == ["chat:read", "chat:edit"]
    me = validate(http, fake_twitch, tokens["access_token"]).json()
    assert (me["login"], me["user_id"]) == ("serda_bot", "1209350837")
    assert poll(http, fake_twitch, device["device_code"]).json()["message"] == "invalid device code"
    fake_twitch.single_use_refresh = False
    assert refresh(http, fake_twitch, tokens["refresh_token"]).status_code == 200
    assert refresh(http, fake_twitch, tokens["refresh_token"]).status_code == 400, "public: single-use"


@pytest.mark.parametrize("ending", ["deny", "expired_token", "access_denied", "device_expires"])
def test_device_grants_that_end_without_tokens(fake_twitch, http, ending):
    if ending == "deny":
        fake_twitch.deny()
    elif ending == "device_expires":
        fake_twitch.device_expires_in = 0
    else:
        fake_twitch.device_answers = [ending]
    device = start_device(http, fake_twitch)
    expected = {"deny": "access_denied", "device_expires": "expired_token"}.get(ending, ending)
    answer = poll(http, fake_twitch, device["device_code"])
    assert (answer.status_code, answer.json()) == (400, {"status": 400, "message": expected})
    assert fake_twitch.device_user_codes() == []
    assert fake_twitch.issued == []


def test_the_authorization_code_flow_redirects_with_a_code_exchanged_once(fake_twitch, http):
    fake_twitch.client_secret = "s3cret"
    fake_twitch.login_as("serda_bot", "1")
    params = {
        "client_id": fake_twitch.client_id, "redirect_uri": "http://localhost:3000/cb", "response_type": "code",
        "scope": "chat:read", "state": "xyz",
    }
    redirect = http.get(fake_twitch.authorize_url, params=params)
    assert redirect.status_code == 302
    location = urlsplit(redirect.headers["Location"])
    query = {k: v[0] for k, v in parse_qs(location.query).items()}
    assert (location.netloc, location.path, query["state"], query["scope"]) == ("localhost:3000", "/cb", "xyz", "chat:read")
    form = {
        "client_id": fake_twitch.client_id, "client_secret": "s3cret", "code": query["code"],
        "grant_type": "authorization_code", "redirect_uri": "http://localhost:3000/cb",
    }
    tokens = http.post(fake_twitch.token_url, data=form)
    assert tokens.status_code == 200 and tokens.json()["scope"] == ["chat:read"]
    reused = http.post(fake_twitch.token_url, data=form)
    assert (reused.status_code, reused.json()["message"]) == (400, "Invalid authorization code")
    fake_twitch.deny()
    denied = parse_qs(urlsplit(http.get(fake_twitch.authorize_url, params=params).headers["Location"]).query)
    assert (denied["error"], denied["state"]) == (["access_denied"], ["xyz"])


def test_helix_users_answers_401_for_a_dead_token(fake_twitch, http):
    token = fake_twitch.mint("serda_bot", "1")
    fake_twitch.mint("other_bot", "2")
    headers = {"Authorization": f"Bearer {token.access_token}", "Client-Id": fake_twitch.client_id}
    me = http.get(f"{fake_twitch.helix_url}/users", headers=headers)
    assert [(u["id"], u["login"]) for u in me.json()["data"]] == [("1", "serda_bot")]
    other = http.get(f"{fake_twitch.helix_url}/users", params={"login": "other_bot"}, headers=headers)
    assert [u["id"] for u in other.json()["data"]] == ["2"]
    fake_twitch.expire(token.access_token)
    dead = http.get(f"{fake_twitch.helix_url}/users", headers=headers)
    assert (dead.status_code, dead.json()) == (401, {"error": "Unauthorized", "status": 401, "message": "Invalid OAuth token"})


def test_rate_limiting_answers_429_with_the_reset_headers(fake_twitch, http):
    token = fake_twitch.mint("serda_bot", "1")
    fake_twitch.rate_limit(requests=2, reset_in=7)
    limited = [validate(http, fake_twitch, token.access_token) for _ in range(3)]
    assert [r.status_code for r in limited] == [429, 429, 200]
    assert limited[0].headers["Retry-After"] == "7" and limited[0].headers["Ratelimit-Remaining"] == "0"
    assert int(limited[0].headers["Ratelimit-Reset"]) > 0
    assert fake_twitch.requests["/oauth2/validate"] == 3


def test_env_points_kissbot_at_the_fake(fake_twitch):
    env = fake_twitch.env()
    assert env["TWITCH_CLIENT_ID"] == fake_twitch.client_id
    assert env["KISSBOT_TWITCH_TOKEN_URL"] == f"{fake_twitch.base_url}/oauth2/token"
    assert env["KISSBOT_TWITCH_DEVICE_URL"] == fake_twitch.device_url
    assert fake_twitch.base_url.startswith("http://127.0.0.1:")


def test_bot_projects_get_the_fixture(pytester):
    pytester.makepyfile(
        test_bot="""
        import httpx

        def test_my_refresh_code(fake_twitch):
            fake_twitch.single_use_refresh = True
            token = fake_twitch.mint("my_bot", "42", ["chat:read"])
            form = {"client_id": fake_twitch.client_id, "grant_type": "refresh_token",
                    "refresh_token": token.refresh_token}
            assert httpx.post(fake_twitch.token_url, data=form).status_code == 200
            assert httpx.post(fake_twitch.token_url, data=form).status_code == 400
        """
    )
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
