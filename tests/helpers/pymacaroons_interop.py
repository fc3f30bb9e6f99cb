#!/usr/bin/env python3
"""pymacaroons (PyPI, an independent implementation) on the other side of ephyr's token format.

  verify-attenuate KEYHEX TOKEN CAVEAT...   verify TOKEN with the root key, append CAVEATs, print
                                             the new token ('mac_' + V2 base64url)
  mint KEYHEX IDENTIFIER CAVEAT...          mint a V2 token with these first-party caveats
  verify KEYHEX TOKEN                       print 'valid' or 'invalid: <reason>'
"""
import binascii, sys

from pymacaroons import MACAROON_V2, Macaroon, Verifier

PREFIX = "mac_"


def load(token):
    assert token.startswith(PREFIX), token
    return Macaroon.deserialize(token[len(PREFIX):])


def verify(m, key):
    v = Verifier()
    v.satisfy_general(lambda predicate: True)  # signature check only: predicates are ephyr's job
    return v.verify(m, key)


cmd, key = sys.argv[1], binascii.unhexlify(sys.argv[2])
if cmd == "verify-attenuate":
    m = load(sys.argv[3])
    verify(m, key)
    for c in sys.argv[4:]:
        m.add_first_party_caveat(c)
    print(PREFIX + m.serialize())
elif cmd == "mint":
    m = Macaroon(location="pymacaroons", identifier=sys.argv[3], key=key, version=MACAROON_V2)
    for c in sys.argv[4:]:
        m.add_first_party_caveat(c)
    print(PREFIX + m.serialize())
elif cmd == "verify":
    try:
        verify(load(sys.argv[3]), key)
        print("valid")
    except Exception as e:  # pymacaroons raises several exception types
        print("invalid: " + type(e).__name__)
else:
    sys.exit("unknown command " + cmd)
