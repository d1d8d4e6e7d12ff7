"""`TokenRepository.claim_due`: the due-token scan that leases what it returns, on both backends."""

from __future__ import annotations

import pytest

from kissbot.crypto import read_key_ring
from kissbot.repo import TokenRepository
from kissbot.types import cipher_of
from _workers import claim_until_empty, run_in_processes

CLAIMED_KEYS = {"user_id", "token_type", "twitch_login", "expires_at", "refresh_failures", "version"}


def claim(mgr, owner, **kwargs):
    with mgr.session() as s:
        return TokenRepository(s).claim_due(owner, **{"ttl": 60, **kwargs})


def users_with_tokens(mgr, expiries):
    ids = []
    for n, expires_in in enumerate(expiries):
        uid = mgr.create_user(str(1000 + n), f"user_{n}")
        mgr.store_tokens(uid, f"a{n}", f"r{n}", expires_in)
        ids.append(uid)
    return ids


def test_claim_due_returns_due_free_rows_and_leases_them(mgr):
    soon, later, reauth, leased = users_with_tokens(mgr, [60, 4 * 3600, 30, 90])
    mgr.store_tokens(soon, "bc-a", "bc-r", 120, token_type="broadcaster")
    mgr.mark_tokens_expired(reauth)
    mgr.increment_refresh_failures(soon)
    with mgr.session() as s:
        assert TokenRepository(s).claim_refresh(leased, "someone-else", ttl=600)
    rows = claim(mgr, "w1")
    assert [(r["twitch_login"], r["token_type"]) for r in rows] == [("user_0", "bot"), ("user_0", "broadcaster")]
    assert set(rows[0]) == CLAIMED_KEYS
    assert (rows[0]["user_id"], rows[0]["refresh_failures"], rows[0]["version"]) == (soon, 1, 1)
    assert rows[0]["expires_at"] == mgr.get_tokens(soon)["expires_at"]
    assert "access_token" not in rows[0] and "refresh_token" not in rows[0]
    assert claim(mgr, "w2") == [], "leased rows are not handed out again"
    assert claim(mgr, "w1") == [], "not even to their holder"
    with mgr.session() as s:
        assert TokenRepository(s).claim_refresh(soon, "w2", ttl=60) is False, "claim_due set the refresh lease"
        assert TokenRepository(s).release_refresh(soon, "w1") is True
    assert [r["token_type"] for r in claim(mgr, "w2")] == ["bot"]
    assert [r["user_id"] for r in claim(mgr, "w3", buffer_minutes=5 * 60)] == [later]


def test_claim_due_with_ciphertext_returns_the_stored_tokens_undecrypted(mgr):
    (uid,) = users_with_tokens(mgr, [60])
    [row] = claim(mgr, "w1", with_ciphertext=True)
    assert set(row) == CLAIMED_KEYS | {"updated_at", "access_token_encrypted", "refresh_token_encrypted"}
    assert row["updated_at"] == mgr.get_tokens(uid)["updated_at"]
    cipher = cipher_of(mgr.engine.dialect)
    assert "a0" not in row["access_token_encrypted"] and "r0" not in row["refresh_token_encrypted"]
    assert (cipher.decrypt(row["access_token_encrypted"]), cipher.decrypt(row["refresh_token_encrypted"])) == ("a0", "r0")


def test_store_tokens_gives_back_the_lease_of_release_lease_and_no_other(mgr):
    mine, theirs = users_with_tokens(mgr, [60, 60])
    assert len(claim(mgr, "w1")) == 2
    with mgr.session() as s:
        repo = TokenRepository(s)
        assert repo.release_refresh(theirs, "w1") and repo.claim_refresh(theirs, "w2", ttl=60)
        repo.store_tokens(mine, "a-new", "r-new", 14400, expected_version=1, release_lease="w1")
        repo.store_tokens(theirs, "a-new", "r-new", 14400, expected_version=1, release_lease="w1")
    assert mgr.get_tokens(mine)["last_validated"] is not None, "the tokens Twitch just issued count as validated"
    with mgr.session() as s:
        assert TokenRepository(s).claim_refresh(mine, "w3", ttl=60), "w1's lease was given back"
        assert not TokenRepository(s).claim_refresh(theirs, "w3", ttl=60), "w2's lease stays"
    assert [(t["version"], t["access_token"]) for t in map(mgr.get_tokens, (mine, theirs))] == [(2, "a-new")] * 2


def test_an_expired_lease_is_claimed_again(mgr):
    (uid,) = users_with_tokens(mgr, [60])
    assert len(claim(mgr, "w1", ttl=-1)) == 1
    assert [r["user_id"] for r in claim(mgr, "w2")] == [uid]


def test_limit_and_order_split_the_due_rows_between_claimers(mgr):
    ids = users_with_tokens(mgr, [300, 60, 240, 120, 180])
    first, second, third = (claim(mgr, f"w{n}", limit=2) for n in range(3))
    by_expiry = [ids[1], ids[3], ids[4], ids[2], ids[0]]
    assert [r["user_id"] for r in first + second + third] == by_expiry
    assert claim(mgr, "w4", limit=2) == []


@pytest.mark.slow
def test_eight_processes_never_claim_the_same_row(mgr, key_file):
    ids = users_with_tokens(mgr, [60 + n for n in range(40)])
    for uid in ids[::4]:
        mgr.store_tokens(uid, "bc-a", "bc-r", 90, token_type="broadcaster")
    url = mgr.url.render_as_string(hide_password=False)
    reports = run_in_processes(claim_until_empty, url, read_key_ring(key_file))
    assert [errors for _, errors, _ in reports] == [[]] * 8
    claimed = [row for _, _, rows in reports for row in rows]
    assert len(claimed) == len(set(claimed)) == 50
    assert set(claimed) == {(uid, "bot") for uid in ids} | {(uid, "broadcaster") for uid in ids[::4]}
