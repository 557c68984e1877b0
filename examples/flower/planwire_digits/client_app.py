"""planwire_digits: the ClientApp. No torch, no model code: the server's plan is the training code."""

from planwire.flower import plan_client_app
from planwire_digits.task import load_data

app = plan_client_app(load_data)
