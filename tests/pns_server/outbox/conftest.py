# A registered client and its paired phone, as the approval tests have them.
from tests.pns_server.approvals.conftest import client, phone

__all__ = ["client", "phone"]
