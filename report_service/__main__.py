from report_service.app import main

main()
