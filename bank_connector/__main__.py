from bank_connector.app import main

main()
