from conftest import ServerProcess


def test_put_get_roundtrip(shop: ServerProcess) -> None:
    shop.ok("/set/put", {"database": "shop", "set": "users", "key": "u1", "value": {"a": 1}})
    assert shop.ok("/set/get", {"database": "shop", "set": "users", "key": "u1"})["data"] == {"a": 1}
