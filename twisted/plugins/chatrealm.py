"""twistd plugin: ``twistd -n chatrealm`` runs a chatproto realm (see chatproto.tap)."""

from twisted.application.service import ServiceMaker

chatrealm = ServiceMaker(
    "chatrealm",
    "chatproto.tap",
    "A chatproto realm server: accounts, private messages, durable history.",
    "chatrealm",
)
