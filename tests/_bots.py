"""A bot process for tests/test_ext_bots.py: TwitchIO or pyTwitchAPI with its tokens in kissbot.

    python tests/_bots.py twitchio|twitchapi add|helix401|validate --url URL --key-file PATH --fake BASE_URL
        --client-id ID --twitch-id ID --go PATH

It opens the store, sets the library up against the fake Twitch at BASE_URL,
prints ``ready``, waits until the file ``--go`` exists (so racing processes
act together), makes the library refresh through its own code path
(``add``: a stored expired token at login / ``set_user_authentication``;
``helix401``: a Helix call with an expired token; ``validate``: TwitchIO's
validation pass), closes the client and prints one JSON line: the SHA-256 of
the access token the library holds (never the token).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import hashlib
import json
import sys
from pathlib import Path

from kissbot.aio import AsyncTokenStore


def digest(token: str | None) -> str | None:
    return hashlib.sha256(token.encode()).hexdigest() if token else None


async def wait_for(go: Path) -> None:
    print("ready", flush=True)
    while not go.exists():
        await asyncio.sleep(0.01)


async def twitchio_bot(args: argparse.Namespace, store: AsyncTokenStore) -> str | None:
    import twitchio
    from twitchio.http import Route

    from kissbot.ext.twitchio import KissbotTokens

    Route.BASE = f"{args.fake}/helix/"
    Route.ID_BASE = f"{args.fake}/"

    class Bot(KissbotTokens, twitchio.Client):
        pass

    bot = Bot(
        token_store=store, client_id=args.client_id, client_secret="app-secret", bot_id=args.twitch_id,
        fetch_client_user=False,
    )
    try:
        if args.scenario == "add":
            await wait_for(args.go)
            await bot.login(token="app-token")
        else:
            await bot.login(token="app-token")
            await wait_for(args.go)
            if args.scenario == "helix401":
                await bot.fetch_users(ids=[args.twitch_id], token_for=args.twitch_id)
            else:
                # TwitchIO validates each token every hour; make ours due and run the pass now.
                bot.tokens[args.twitch_id]["last_validated"] = (
                    datetime.datetime.now() - datetime.timedelta(hours=2)
                ).isoformat()
                await bot.http._revalidate_all()
        held = bot.tokens.get(args.twitch_id)
        return held["token"] if held else None
    finally:
        await bot.close()


async def twitchapi_bot(args: argparse.Namespace, store: AsyncTokenStore) -> str | None:
    from twitchAPI.helper import first
    from twitchAPI.twitch import Twitch
    from twitchAPI.type import AuthScope

    from kissbot.ext.twitchapi import KissbotUserAuth

    twitch = Twitch(
        args.client_id, "app-secret", authenticate_app=False,
        base_url=f"{args.fake}/helix/", auth_base_url=f"{args.fake}/oauth2/",
    )
    auth = KissbotUserAuth(twitch, store, twitch_user_id=args.twitch_id, scopes=[AuthScope.CHAT_READ])
    try:
        if args.scenario == "add":
            await wait_for(args.go)
            await auth.bind()
        else:
            await auth.bind()
            await wait_for(args.go)
            await first(twitch.get_users())
        return twitch.get_user_auth_token()
    finally:
        await twitch.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("library", choices=["twitchio", "twitchapi"])
    parser.add_argument("scenario", choices=["add", "helix401", "validate"])
    for option in ("--url", "--key-file", "--fake", "--client-id", "--twitch-id"):
        parser.add_argument(option, required=True)
    parser.add_argument("--go", type=Path, required=True)
    args = parser.parse_args()
    async with AsyncTokenStore(url=args.url, key_file=args.key_file) as store:
        run = twitchio_bot if args.library == "twitchio" else twitchapi_bot
        held = await run(args, store)
    print(json.dumps({"holds": digest(held)}), flush=True)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
