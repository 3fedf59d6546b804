"""The bank connector: the only service that talks to the banks. It asks them in parallel,
streams each bank's outcome as it arrives, and masks every card number it receives, so that a
full card number from a bank never leaves this service."""
